"""The engine's kernels: every kind of Linear it runs, and which one this CPU gets. INT8: FBGEMM's dynamic INT8 for
a lone token; several rows (a prompt, a batch of sequences) quantized row by row, on FBGEMM, on oneDNN, or compiled
by PyTorch's own compiler (inductor's C++ backend) into one pass around `torch._int_mm`. BF16: oneDNN's prepacked
matmul, or FBGEMM's fp16 GEMM where oneDNN has no BF16 path. The model (runtime/engine.py) only calls them."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from quantize.machine import cpu_flags

# FBGEMM's own switch (read once, at its first GEMM) can hold it below the CPU's best ISA; these names keep VNNI
FBGEMM_ISA = "FBGEMM_ENABLE_INSTRUCTIONS"
FBGEMM_VNNI = ("AVX512_E1", "AVX512_E1_256")


def full_range_activations(flags: set[str] | None = None) -> bool:
    """u8 activations use all 8 bits only where FBGEMM runs a VNNI kernel (vpdpbusd accumulates in int32);
    without it `vpmaddubsw` adds two u8*s8 products in int16, which saturates, so activations keep 7 bits."""
    forced = os.environ.get(FBGEMM_ISA)
    return "avx512_vnni" in (cpu_flags() if flags is None else flags) and forced in (None, *FBGEMM_VNNI)


# The smallest INT8 Linear (in weights) whose calls of several rows go to oneDNN in a batched engine. Below it the
# quantization around the GEMM, not the GEMM, is most of a batched call's time, so a second copy of the weights
# buys little: the default model's 576 x 3072 gate_up runs 8 rows in 95 us on oneDNN, 105 on FBGEMM; 1.5B's
# 17920 x 1536 in 608 against 817 (2 vCPU Xeon with AMX, 2 threads).
ONEDNN_ROWS_MIN_WEIGHTS = 2_000_000


# oneDNN's own switch (ONEDNN_MAX_CPU_ISA) can hold it below the CPU's best ISA; these caps leave it no int8 dot
# product (VNNI or AMX), so u8 codes would meet vpmaddubsw's int16 saturation, or no native BF16 path
ONEDNN_ISA = "ONEDNN_MAX_CPU_ISA"
ONEDNN_NO_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}


def onednn_capped(below: set[str]) -> bool:
    return os.environ.get(ONEDNN_ISA, "").upper() in below


def onednn_rows(flags: set[str] | None = None) -> bool:
    """Whether an INT8 Linear may run its calls of several rows (a batch of sequences, a prompt) on oneDNN's
    prepacked u8s8 GEMM: where the CPU has VNNI or AMX, which oneDNN uses. Its time stays flat in the rows where
    FBGEMM's grows (2 vCPU Xeon with AMX, 1.5B gate_up 17920 x 1536, 2 threads: oneDNN 470 us at 1, 8 and 16
    rows; FBGEMM 455 us at 1 row, 590 at 8). It sums the same codes exactly: the outputs are FBGEMM's to the bit
    without a bias, within 1e-5 of their range with one (the bias is added in another order)."""
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"} & (cpu_flags() if flags is None else flags)
    return bool(vnni) and not onednn_capped(ONEDNN_NO_VNNI)


# ATen's ChooseQuantizationParams: a scale below this is raised to it
SMALL_SCALE = 6.1e-5


def token_qparams(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's activation scale and zero point ([M, 1] each), as FBGEMM's dynamic Linear picks them for a
    lone row: the row's range widened to hold 0, split in qmax steps (in double, then float), the zero point
    the nearest step to -min/scale. A scale raised to SMALL_SCALE keeps its zero point (ATen widens the range
    with it); an all-zero row gets zero point 0."""
    lo = x.amin(-1, keepdim=True).clamp_(max=0).double()
    hi = x.amax(-1, keepdim=True).clamp_(min=0).double()
    scale = (hi - lo).div_(qmax)
    zero = lo.div_(scale).neg_().nan_to_num_(0.0).round_()
    return scale.clamp_(min=SMALL_SCALE).float(), zero.float()


def rescale_rows(
    y: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    row_sums: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The GEMM of the codes (zero + x / scale) with activation scale 1 and zero point 0 gave
    y' = w_scale * sum(codes * q) + bias. Each row's own scale and zero point factor out of the integer sum
    exactly: y = scale * (y' - bias - zero * row_sums) + bias, row_sums the dequantized weight's (one addmm)."""
    left = -scale * zero if bias is None else torch.cat([-scale * zero, 1 - scale], 1)
    right = row_sums[None] if bias is None else torch.stack([row_sums, bias])
    return y.mul_(scale).addmm_(left, right)


def w8a8_rows(
    x: torch.Tensor, kn: torch.Tensor, code_sums: torch.Tensor, w_scale: torch.Tensor, qmax: int
) -> torch.Tensor:
    """Several rows through an INT8 Linear in one compiled pass: each row's codes as token_qparams picks them (so
    each row gives the numbers it gives alone), shifted to s8 (code - 128) for `torch._int_mm` against the [K, N]
    weight codes, and the shift taken back out of the integer sums exactly: sum((c - z) q) = sum((c - 128) q) +
    (128 - z) sum(q), code_sums being sum(q) per output. Then the row and column scales. Inductor fuses the
    quantization into one pass over the rows and the rescale into the GEMM's epilogue; eager, this is ~10 ops."""
    lo = x.amin(-1, keepdim=True).clamp(max=0).double()
    hi = x.amax(-1, keepdim=True).clamp(min=0).double()
    scale = (hi - lo) / qmax
    zero = torch.round(torch.nan_to_num(-lo / scale, 0.0)).float()
    scale = scale.clamp(min=SMALL_SCALE).float()
    codes = torch.round(zero + x * scale.reciprocal()).clamp(0, qmax) - 128
    sums = torch._int_mm(codes.to(torch.int8), kn).float() + (128 - zero) * code_sums
    return sums * (scale * w_scale)


def use_project_cache() -> None:
    """Inductor keeps what it builds under the project's cache, so a warm start reuses it (TORCHINDUCTOR_CACHE_DIR,
    if set, wins), in a folder per torch, ATen capability and CPU: a cache folder may outlive the machine it was
    built on, or be read by a process held to other kernels. Called before inductor's first look at its folder,
    where it writes its own default into the environment."""
    from quantize.models import cache_dir

    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    kind = f"{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-{flags}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor" / kind))


@functools.cache
def compiler() -> str | None:
    """The C++ compiler inductor calls ($CXX, else g++), found the way inductor finds it; None without one."""
    use_project_cache()
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


@functools.cache
def compiled_rows() -> Callable:
    """w8a8_rows compiled once for every shape (dynamic: one graph for any rows, K and N). Its C++ kernels are
    kept on disk (use_project_cache) and found again by their source; inductor's cache of whole graphs is off: a
    graph it read back in another process (built for other shapes, under AVX2-held kernels) gave NaNs. Measured,
    2 cores, default model: 13 s cold, 7 s warm, at load."""
    use_project_cache()
    return torch.compile(w8a8_rows, dynamic=True, options={"fx_graph_cache": False})


# How an INT8 Linear runs several rows, by what a loaded engine may afford (runtime/engine.load): FBGEMM from its
# one packed copy; or from a second copy of the weights, oneDNN's prepacked u8s8 GEMM (eager), or compiled.
ROWS_LABEL = {"fbgemm": "", "onednn": ", oneDNN INT8 for several rows", "compiled": ", compiled INT8 rows"}
# The compiled rows are asked for, not the default: they need a second copy of every INT8 Linear, which takes
# INT8's resident memory from 0.64x BF16's to ~1.0x on the default model (quantize/README.md, "Compiled"); the
# oneDNN copy is made only for Linears of ONEDNN_ROWS_MIN_WEIGHTS or more, and is as fast on those.
COMPILED_ROWS = "Q8CHAT_COMPILED_ROWS"


# The compiled decode step (runtime/engine.py, compile_tokens) is the default where a C++ compiler is found;
# Q8CHAT_COMPILED_STEP=0 keeps the eager step. Its graphs take a few minutes to build per model on 2 vCPUs the
# first time (the C++ kernels are kept on disk: a warm start reads them back), and the compiler's own state adds
# ~200-350 MB to each process's resident memory (quantize/README.md, "The decode step, compiled").
COMPILED_STEP = "Q8CHAT_COMPILED_STEP"


def step_wanted() -> bool:
    """Whether engines are to compile their decode step: unless Q8CHAT_COMPILED_STEP=0 turns it off."""
    return os.environ.get(COMPILED_STEP, "1") != "0"


def compiled_step() -> bool:
    """Whether engines compile their decode step (a lone token, a batch): wanted (step_wanted) and a C++ compiler
    found."""
    return step_wanted() and compiler() is not None


def rows_kind(second_copy: bool, reduce_range: bool) -> str:
    """How an engine's INT8 Linears run several rows: with room for a second copy of the weights, compiled where
    asked for (Q8CHAT_COMPILED_ROWS=1) and inductor finds a C++ compiler, else on oneDNN where the CPU has VNNI or
    AMX; FBGEMM otherwise. 8-bit codes go to `_int_mm` (oneDNN) only where oneDNN has VNNI or AMX: its AVX2
    kernel saturates them, as FBGEMM's does."""
    if not second_copy:
        return "fbgemm"
    asked = os.environ.get(COMPILED_ROWS) == "1"
    if asked and compiler() and (reduce_range or onednn_rows()):
        return "compiled"
    return "onednn" if onednn_rows() else "fbgemm"


# A compiled decode step (runtime/engine.py, Engine.tokens) sees every Linear as one opaque op, q8chat::linear:
# inductor fuses the glue between them (norms, RoPE, the softmax, residuals) while each GEMM stays the kernel it is
# eagerly. Dynamo cannot trace FBGEMM's packed weights (a TorchScript object), so the op finds its Linear by number.
# A Library op, not torch.library.custom_op: 5 us a call against 10 (2-vCPU AMD EPYC), ~120 calls a token.
LINEARS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # weak: a dropped engine's weights go
NUMBERS = itertools.count()
OPS = torch.library.Library("q8chat", "DEF")
OPS.define("linear(Tensor x, int linear) -> Tensor")
OPS.impl("linear", lambda x, linear: LINEARS[linear].run(x), "CPU")
# an INT8 Linear's GEMM of several rows' codes alone: their quantization and rescale join the compiled graph
OPS.define("rows_gemm(Tensor codes, int linear) -> Tensor")
OPS.impl("rows_gemm", lambda codes, linear: LINEARS[linear].rows_gemm(codes), "CPU")
for op in ("linear", "rows_gemm"):
    torch.library.register_fake(f"q8chat::{op}", lib=OPS)(
        lambda x, linear: x.new_empty(*x.shape[:-1], LINEARS[linear].out_features)
    )


class Kernel:
    """What every Linear kind shares: `run(x)` computes it, `out_features` its width; called while the compiler
    traces a step, it is the op q8chat::linear instead."""

    out_features: int

    def __new__(cls, *args, **kwargs) -> Kernel:
        self = super().__new__(cls)
        self.number = next(NUMBERS)
        LINEARS[self.number] = self
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x) if torch.compiler.is_compiling() else self.run(x)

    def traced(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.q8chat.linear(x, self.number)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(Kernel):
    """FBGEMM dynamic INT8: s8 weights per output channel, u8 activations with one scale per token. A token
    alone is FBGEMM's per-call scale; several rows (a prompt, a batch of sequences) are quantized row by row first
    (by_rows), so each row gives the numbers it gives alone. With `rows` "onednn" those rows' GEMM is oneDNN's
    (see onednn_rows), with "compiled" they run w8a8_rows; both from a second copy of the weights. A lone token
    keeps FBGEMM, the fastest there (compiled, a lone row ran 2-5x slower: quantize/README.md, "Compiled")."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        reduce_range: bool,
        rows: str = "fbgemm",
    ) -> None:
        zero = torch.zeros(scale.numel(), dtype=torch.long)
        w = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero, 0)
        self.bias = None if bias is None else bias.float()
        self.packed = torch.ops.quantized.linear_prepack(w, self.bias)
        self.rows, self.scale, self.out_features = rows, scale.float(), scale.numel()
        self.onednn = torch.ops.onednn.qlinear_prepack(qweight, None) if rows == "onednn" else None
        self.kn = qweight.t().contiguous() if rows == "compiled" else None  # _int_mm's [K, N] layout
        # qlinear_pointwise's arguments after the codes, made once: activation scale 1 and zero point 0, the
        # weights with their scales, no bias (added after), FP32 out
        self.onednn_args = (
            1.0,
            0,
            self.onednn,
            scale.float(),
            zero,
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        self.reduce_range, self.qmax = reduce_range, 127 if reduce_range else 255
        # numpy sums in int32 through a small buffer; torch's sum(dtype=...) converted the matrix first and raised
        # the default model's load peak from 239 to 358 MB
        self.code_sums = torch.from_numpy(qweight.numpy().sum(1, dtype=np.int32)).float()
        self.row_sums = self.code_sums * scale.float()
        self.nbytes = qweight.numel() + scale.numel() * 4 + (0 if bias is None else bias.numel() * 4)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        return self.by_rows(x)

    def traced(self, x: torch.Tensor) -> torch.Tensor:
        """In a compiled step, several rows' quantization and rescale join the graph around the GEMM alone."""
        if x.shape[0] == 1 or self.kn is not None:
            return super().traced(x)
        return self.by_rows(x)

    def by_rows(self, x: torch.Tensor) -> torch.Tensor:
        """One GEMM for every row, each with its own scale; the GEMM of the codes gives each row's integer sums
        times the weights' scales, and rescale_rows factors the row's own scale and zero point back in."""
        if self.kn is not None:
            y = compiled_rows()(x, self.kn, self.code_sums, self.scale, self.qmax)
            return y if self.bias is None else y.add_(self.bias)
        scale, zero = token_qparams(x, self.qmax)
        codes = torch.addcmul(zero, x, scale.reciprocal()).clamp_(0, self.qmax)
        if torch.compiler.is_compiling():
            y = torch.ops.q8chat.rows_gemm(codes, self.number)
        else:
            y = self.rows_gemm(codes)
        return rescale_rows(y, scale, zero, self.row_sums, self.bias)

    def rows_gemm(self, codes: torch.Tensor) -> torch.Tensor:
        """w_scale * sum(codes * q) + bias for rows of codes in [0, qmax], not yet rounded. FBGEMM gets them with
        one more row of qmax, which pins its per-call scale to exactly 1 and its zero point to 0, so it rounds
        each code as a lone row's call would. oneDNN gets them rounded as FBGEMM rounds (to nearest, ties to
        even), as u8 with activation scale 1 and zero point 0, and the bias after, in FP32 (FBGEMM's epilogue
        adds it in another order: the last bit may differ)."""
        if self.onednn is None:
            pinned = torch.cat([codes, codes.new_full((1, codes.shape[1]), self.qmax)])
            return torch.ops.quantized.linear_dynamic(pinned, self.packed, self.reduce_range)[:-1]
        y = torch.ops.onednn.qlinear_pointwise(codes.round().to(torch.uint8), *self.onednn_args)
        return y if self.bias is None else y.add_(self.bias)


class WeightOnlyInt8Linear(Kernel):
    """The same s8 weights and scales, BF16 activations (`torch._weight_int8pack_mm`): for the input 7-bit
    activations cannot carry. down_proj's input, silu(gate) * up, holds the outlier channels; on the default model
    7-bit activations there cost top-1 0.872 -> 0.846, this kernel there gives 0.883 (quantize/README.md, "CPUs")."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.qweight, self.scale, self.bias = qweight.contiguous(), scale.to(torch.bfloat16), bias
        self.out_features = qweight.shape[0]
        self.nbytes = qweight.numel() + scale.numel() * 2 + (0 if bias is None else bias.numel() * 4)

    @staticmethod
    def takes(in_features: int) -> bool:
        return in_features % 16 == 0  # the kernel's inner blocking: other widths return inf/nan in torch 2.13

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias


class FloatLinear(Kernel):
    """`F.linear` in the weight's dtype (an INT8 folder's FP32 tail); the result comes back in the activations'."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight.contiguous(), None if bias is None else bias.to(weight.dtype)
        self.dtype, self.out_features = weight.dtype, weight.shape[0]
        self.nbytes = weight.numel() * weight.element_size() + (0 if bias is None else bias.numel() * 2)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)


class OneDnnBf16Linear(Kernel):
    """A BF16 Linear on oneDNN's matmul with the weight prepacked once: `F.linear` on a plain BF16 weight ran a
    decode step 1.7-2.5x slower (quantize/README.md, "The BF16 side"), and prefill is as fast or faster. Needs oneDNN's BF16
    path (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""

    kernel = "oneDNN prepacked"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.dtype, self.bias = torch.bfloat16, None if bias is None else bias.to(torch.bfloat16)
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        self.nbytes = weight.numel() * 2 + (0 if bias is None else bias.numel() * 2)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)


class Fp16GemmBf16Linear(Kernel):
    """A BF16 Linear on FBGEMM's fp16 GEMM, for CPUs where oneDNN has no BF16 path (there ATen emulates BF16,
    4-5x slower in prefill). The weights keep their BF16 values: scaled by one power of two so the largest sits
    just under fp16's top, every value down to 2^-32 of the largest is exact in fp16 (BF16 has 8 significant bits,
    fp16 10), smaller ones round to within 2^-41 of it; the output is scaled back exactly."""

    kernel = "FBGEMM fp16 GEMM"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.dtype, self.bias = torch.bfloat16, None if bias is None else bias.float()
        self.out_features, w = weight.shape[0], weight.float()
        self.shift = 15 - math.ceil(math.log2(w.abs().max().item() or 1.0))
        self.packed = torch.ops.quantized.linear_prepack_fp16(w.mul_(2.0**self.shift), None)
        self.nbytes = weight.numel() * 2 + (0 if bias is None else bias.numel() * 2)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).mul_(2.0**-self.shift)
        return (y if self.bias is None else y.add_(self.bias)).to(x.dtype)


def bf16_linear() -> type:
    """The BF16 Linear this CPU runs fastest: oneDNN's where it has a BF16 path, FBGEMM's fp16 GEMM elsewhere."""
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported() and not onednn_capped(ONEDNN_NO_BF16)
    return OneDnnBf16Linear if native else Fp16GemmBf16Linear


Linear = Int8Linear | WeightOnlyInt8Linear | FloatLinear | OneDnnBf16Linear | Fp16GemmBf16Linear
