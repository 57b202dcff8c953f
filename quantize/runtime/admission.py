"""Who sent a request, and what they may hold: the limits on Gradio's queue (per visitor, per address) and who may
change the Space for everyone (switch the models, hold the CPU with the benchmark).

Every limit keys on what a client cannot mint for free. A session hash is the client's to choose (a script sends a
fresh one with every join, or none at all through /gradio_api/call), so each request is also counted against the
address it came from:
- On a Space, the peer is the Space proxy's internal address (one for every visitor). The proxy appends the address
  it saw to X-Forwarded-For; whatever the client wrote itself comes before it. So the address is the entry
  PROXY_HOPS from the right (1: HF's proxy alone; another proxy of yours in front adds one), never the left-most.
- Off a Space, the peer. (uvicorn already replaces a loopback peer by X-Forwarded-For's right-most untrusted entry:
  a reverse proxy on this machine names its client; FORWARDED_ALLOW_IPS widens whom it trusts.)
- A loopback address is this machine's own clients (the owner, the tests): its sessions are not grouped.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time

from fastapi import HTTPException

# What one visitor may have waiting or running at once (a reply, Clear's follow-up, the next message), and what
# every session and session-less call from one address may hold together (a few tabs; the rest of the 8 reply
# slots stay free for others)
PER_VISITOR, PER_ADDRESS = 3, 4
PROXY_HOPS = max(int(os.environ.get("Q8CHAT_PROXY_HOPS", "1")), 1)
OWNER_ONLY = (
    "This changes the Space for every visitor: it needs the Space owner's admin token (Q8CHAT_ADMIN_TOKEN)."
)
OFF_ON_A_SPACE = "Switching models and the benchmark are off on this Space: its owner turns them on with Q8CHAT_ADMIN_TOKEN."
LOCAL_ONLY = (
    "Switching models and the benchmark are open only on the machine that runs the app "
    "(or to whoever gives Q8CHAT_ADMIN_TOKEN)."
)


def on_a_space() -> bool:
    """HF sets both; Gradio reads SYSTEM, the Hub's docs name SPACE_ID: either means the Space's proxy is in
    front."""
    return bool(os.environ.get("SPACE_ID")) or os.environ.get("SYSTEM") == "spaces"


def address_of(request) -> str | None:
    """The address a request came from, as the proxy in front saw it (see the module's docstring); None for this
    machine's own clients."""
    if request is None:
        return None
    peer = request.client.host if request.client else ""
    address = peer
    if on_a_space():
        headers = request.headers  # a client may send the header twice: every line counts, in order
        lines = (
            headers.getlist("x-forwarded-for")
            if hasattr(headers, "getlist")
            else [headers.get("x-forwarded-for", "")]
        )
        hops = [h.strip() for line in lines for h in line.split(",") if h.strip()]
        address = hops[-PROXY_HOPS] if len(hops) >= PROXY_HOPS else peer
    return None if not address or is_loopback(address) else address


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def visitor_of(session: str | None, request) -> tuple[str, str | None]:
    """(who, address): who is the session, or for a session-less call the address it came from (all of one
    address's session-less calls are one visitor)."""
    address = address_of(request)
    return session or f"no session, from {address or 'this machine'}", address


def event_visitor(event) -> tuple[str, str | None]:
    """visitor_of for an event already in Gradio's queue: Gradio names a session-less event by its own id."""
    session = event.session_hash if event.session_hash != event._id else None
    return visitor_of(session, event.request)


def admit_fairly(queue) -> None:
    """Gradio's queue takes any number of one client's requests, up to its size: one script filled it and every
    other visitor was told the queue is full. Each join is now counted against what the same visitor, and the
    same address, already have waiting or running, and refused (HTTP 429, with the sentence) beyond PER_VISITOR or
    PER_ADDRESS."""
    push = queue.push

    async def push_fairly(body, request, username):
        visitor, address = visitor_of(body.session_hash, request)
        waiting = [e for q in queue.event_queue_per_concurrency_id.values() for e in q.queue]
        running = [e for job in queue.active_jobs if job for e in job]
        others = [event_visitor(e) for e in waiting + running]
        if sum(v == visitor for v, _ in others) >= PER_VISITOR:
            raise HTTPException(
                429, f"You already have {PER_VISITOR} requests waiting or running; wait for them."
            )
        if address and sum(a == address for _, a in others) >= PER_ADDRESS:
            raise HTTPException(
                429, f"Your address already has {PER_ADDRESS} requests waiting or running; wait for them."
            )
        request.state.joined_at = time.monotonic()  # a Clear after it drops it (sessions.cleared_since)
        return await push(body, request, username)

    queue.push = push_fairly


def joined_at(request) -> float | None:
    """When a request joined the queue (time.monotonic), as push_fairly noted it; None for one that did not."""
    return getattr(getattr(request, "state", None), "joined_at", None)


def owner_refusal(token, request) -> str | None:
    """None when the caller may change the Space for every visitor (switch the models, hold the CPU for a
    benchmark): with Q8CHAT_ADMIN_TOKEN set, whoever gives it; without one, only a client on this machine (whoever
    runs `python app.py` owns it; a server bound to 0.0.0.0 is not everyone's). Else the sentence that says why."""
    admin = os.environ.get("Q8CHAT_ADMIN_TOKEN", "")
    if admin:
        given = token.encode() if isinstance(token, str) else b""
        return None if hmac.compare_digest(given, admin.encode()) else OWNER_ONLY
    if on_a_space():
        return OFF_ON_A_SPACE
    if request is None:  # called in this process, not over HTTP
        return None
    peer = request.client.host if request.client else ""
    return None if peer and is_loopback(peer) else LOCAL_ONLY
