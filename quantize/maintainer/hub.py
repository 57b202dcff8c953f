"""Pushing the INT8 folder to the Hub: one atomic commit, token from the environment or the stored login."""

from __future__ import annotations

from pathlib import Path

from quantize.errors import ModelError


def get_token() -> str | None:
    """HF_TOKEN, or the token saved by `huggingface-cli login`; never printed anywhere."""
    from huggingface_hub import get_token as stored

    return stored()


def planned_files(folder: Path) -> list[tuple[str, int]]:
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    )


def push(
    folder: Path,
    repo_id: str,
    private: bool = False,
    commit_message: str = "Upload INT8 SmoothQuant model",
    token: str | None = None,
) -> str:
    """Create the repo if missing and upload `folder` in one commit; returns the commit URL.

    A commit on the Hub is all-or-nothing: if the upload dies halfway the repo stays at its last commit, and a
    rerun uploads again (LFS files already on the server are skipped by the client)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise ModelError("No Hub token: set HF_TOKEN or run `huggingface-cli login` before --push-to-hub.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, repo_type="model"
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = " (check that the token can write to it)" if status in (401, 403) else ""
        raise ModelError(
            f"Pushing to {repo_id!r} failed with HTTP {status}{hint}; the repo is unchanged."
        ) from e
    except (OSError, ValueError) as e:  # connection reset, timeouts, bad repo id
        raise ModelError(f"Pushing to {repo_id!r} failed ({type(e).__name__}); the repo is unchanged.") from e
    return str(getattr(info, "commit_url", info))
