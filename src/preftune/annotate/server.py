"""The annotation web server: Starlette on uvicorn, one HTML page, a small JSON API, safe by default.

Routes: ``GET /`` (the page), ``GET /overview`` (the read-only overview page), ``GET /static/<file>``, and under
``/api/`` (all need the annotators' token): ``GET /api/status`` (items per task, the guidelines' blocks —
:mod:`preftune.annotate.guidelines`), ``POST /api/next`` ``{task, annotator}`` → ``{item, progress}`` (``item``
is ``{id, prompt, left, right}`` or null when nothing is left), ``POST /api/vote`` ``{task, item, annotator,
choice, note, session}`` → ``{recorded, progress}``, ``POST /api/undo`` ``{task, annotator, session}`` →
``{item, choice, note, progress}`` (the annotator's last vote, cast from this page ``session``, retracted and its
item shown again), ``POST /api/skip`` ``{task, item, annotator, session}`` → ``{progress}``. The API never says
which side is which (no scores, no judge, no label), so an evaluation stays blind. ``GET /api/overview`` needs
the **admin** token instead (the annotators' token is refused there): counts per task and annotator, agreement
so far and the items with split votes (:func:`preftune.annotate.results.overview`), never who voted what.

Safety, each a check in :class:`Guard` before any route runs:

* binds 127.0.0.1 by default; any other address needs an explicit access token (:func:`check_bind`); on a
  loopback address the Host header must name loopback too (no DNS rebinding);
* every ``/api/`` request carries ``Authorization: Bearer <token>`` (compared in constant time): the admin token
  for ``/api/overview``, the annotators' token for the rest; the pages read it from the URL's fragment (never
  sent to the server, never in logs) and keep it in sessionStorage;
* every write (POST) is same-origin — its Origin (or, without one, its Referer) names this Host — and is JSON
  (``Content-Type: application/json``, which a cross-site form cannot send without a CORS preflight this server
  never answers), so no other site can make a browser write (CSRF);
* request bodies are at most :data:`MAX_BODY` bytes, names :data:`MAX_NAME` characters, notes :data:`MAX_NOTE`;
* the pages render every text with ``textContent`` (never as HTML; the guidelines' Markdown arrives as plain
  data), and a Content-Security-Policy allows only this server's own script and style, so a response holding
  ``<script>`` is shown as text, never run;
* a vote is answered only after its transaction committed (:meth:`AnnotationStore.vote`).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import re
import secrets
import socket
import unicodedata
from importlib import resources
from urllib.parse import urlsplit

from preftune.annotate.items import TASKS
from preftune.annotate.results import overview
from preftune.annotate.store import CHOICES, AnnotationStore, Refused, has_lone_surrogate
from preftune.errors import ConfigError

MAX_BODY = 16 * 1024  # bytes of one request body
MAX_NAME = 64  # characters of an annotator's name
MAX_NOTE = 2000  # characters of a note
MIN_TOKEN = 16  # characters of an access token given by hand
MAX_ID = 2**63 - 1  # the largest id a database row can have
SESSION = re.compile(r"[A-Za-z0-9_-]{16,64}")  # a page session id: the page draws 128 random bits
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # not no-referrer: that would make the browser send `Origin: null`
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "overview.js": "text/javascript; charset=utf-8"}
ADMIN_PATHS = ("/api/overview",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> None:
    """A TCP port: 0 (any free one) to 65535."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is a number from 1 to 65535 (0 picks a free one); e.g. --port 8765")


def check_bind(host: str, token: str | None) -> str:
    """The access token to use: ``token`` as given, or a fresh random one on a loopback address. Any other
    address without a token of at least :data:`MIN_TOKEN` characters is a :class:`ConfigError`."""
    if token is not None and len(token) < MIN_TOKEN:
        raise ConfigError(f"--token: at least {MIN_TOKEN} characters, got {len(token)}; e.g. "
                          "python -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if token is None:
        if not is_loopback(host):
            raise ConfigError(f"--host {host}: serving beyond this machine needs an access token; pass --token "
                              "(or set PREFTUNE_ANNOTATE_TOKEN) and give it to your annotators, or keep the default "
                              "--host 127.0.0.1")
        token = secrets.token_urlsafe(24)
    return token


class Guard:
    """ASGI middleware: host, token, same-origin, content type and size checks (see the module docstring), and
    security headers on every response."""

    def __init__(self, app, *, token: str, admin_token: str, loopback_only: bool, max_body: int = MAX_BODY):
        self.app, self.token, self.loopback_only, self.max_body = app, token.encode(), loopback_only, max_body
        self.admin_token = admin_token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._check(scope, headers)
        if problem is None and scope["method"] not in ("GET", "HEAD") and scope["path"].startswith("/api/"):
            body, problem = await self._read_body(headers, receive)
            if problem is None:
                receive = _replay(body)
        if problem is not None:
            status, message = problem
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            return await _send_json(secured_send, status, {"error": message}, extra)
        return await self.app(scope, receive, secured_send)

    def _check(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if self.loopback_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return 400, f"unexpected Host {host!r}: this server answers on loopback addresses only"
        if not scope["path"].startswith("/api/"):
            return None
        given = headers.get("authorization", "")
        admin = scope["path"] in ADMIN_PATHS
        wanted = self.admin_token if admin else self.token
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip().encode(), wanted):
            if admin:
                return 401, ("missing or wrong admin token (Authorization: Bearer <token>); open the overview URL "
                             "the server printed")
            return 401, "missing or wrong access token (Authorization: Bearer <token>); open the URL the server printed"
        if scope["method"] in ("GET", "HEAD"):
            return None
        origin = headers.get("origin")
        source = origin if origin is not None else headers.get("referer")
        if source is None or source == "null" or urlsplit(source).netloc.lower() != host.lower():
            return 403, "cross-origin write refused: a write needs an Origin (or Referer) naming this server"
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "a write must be JSON (Content-Type: application/json)"
        return None

    async def _read_body(self, headers: dict[str, str], receive) -> tuple[bytes, tuple[int, str] | None]:
        too_big = 413, f"request body over {self.max_body} bytes"
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return b"", too_big
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "the client went away")
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return b"", too_big
            if not message.get("more_body", False):
                return bytes(body), None


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def json_bytes(payload: dict) -> bytes:
    """JSON with ``<``, ``>`` and ``&`` escaped (``\\u003c`` …), so no response body ever holds markup, whatever
    a browser makes of it."""
    text = json.dumps(payload, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("utf-8")


async def _send_json(send, status: int, payload: dict, extra_headers=()) -> None:
    body = json_bytes(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------ request fields


def _field(payload: dict, name: str, kind: type, *, required: bool = True):
    if name not in payload:
        if required:
            raise Refused(400, f"field '{name}' is missing")
        return None
    value = payload[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Refused(400, f"field '{name}' must be {'an integer' if kind is int else 'a string'}")
    if kind is int and not 0 <= value <= MAX_ID:  # the databases store 64-bit integers
        raise Refused(400, f"field '{name}' must be an id from /api/next (0 to {MAX_ID}), got a number out of that "
                      "range")
    if kind is str and has_lone_surrogate(value):  # JSON's "\ud800" escape: no UTF-8 text, no database takes it
        raise Refused(400, f"field '{name}' holds a lone UTF-16 surrogate (\\ud800–\\udfff), which is not text; "
                      "send UTF-8 text")
    return value




def session_id(payload: dict, *, required: bool) -> str:
    """The page's session id (``session``: 16 to 64 letters, digits, ``-`` or ``_``), or '' when absent and not
    required."""
    value = _field(payload, "session", str, required=required)
    if value is None:
        return ""
    if not SESSION.fullmatch(value):
        raise Refused(400, "field 'session' must be 16 to 64 letters, digits, '-' or '_' (the page draws it)")
    return value


def annotator_name(value: str) -> str:
    """An annotator's name: 1 to :data:`MAX_NAME` characters once trimmed, no control characters."""
    name = value.strip()
    if not 1 <= len(name) <= MAX_NAME:
        raise Refused(400, f"field 'annotator' must hold 1 to {MAX_NAME} characters, got {len(name)}")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise Refused(400, "field 'annotator' must not hold control or format characters")
    return name


def _payload(raw: bytes, allowed: set[str]) -> dict:
    try:
        payload = json.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise Refused(400, "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise Refused(400, "the body must be a JSON object")
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise Refused(400, f"unknown fields {unknown}; expected {sorted(allowed)}")
    task = _field(payload, "task", str)
    if task not in TASKS:
        raise Refused(400, f"field 'task' must be one of {', '.join(TASKS)}")
    payload["annotator"] = annotator_name(_field(payload, "annotator", str))
    return payload


# ------------------------------------------------------------------------------------ the app


def create_app(store: AnnotationStore, *, token: str, admin_token: str | None = None, votes_per_item: int = 1,
               loopback_only: bool = True, guidelines: list[dict] | None = None):
    """The ASGI app over ``store``, wrapped in :class:`Guard`; ``guidelines`` are the blocks of
    :func:`preftune.annotate.guidelines.read_guidelines`; without an ``admin_token`` the overview takes a random
    one (unknown to anyone: closed)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response
    from starlette.routing import Route

    if votes_per_item < 1:
        raise ConfigError(f"--votes-per-item must be at least 1, got {votes_per_item}")
    static = resources.files("preftune.annotate") / "static"
    files = {name: (static / name).read_bytes() for name in ("index.html", "overview.html", *STATIC)}

    def answer(payload: dict, status: int = 200) -> Response:
        return Response(json_bytes(payload), status_code=status, media_type="application/json",
                        headers={"cache-control": "no-store"})

    def html(name: str):
        async def page(request):
            return Response(files[name], media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"})
        return page

    async def asset(request):
        name = request.path_params["name"]
        if name not in STATIC:
            return answer({"error": "not found"}, 404)
        return Response(files[name], media_type=STATIC[name], headers={"cache-control": "no-cache"})

    async def status(request):
        return answer({"tasks": await run_in_threadpool(store.count_items), "votes_per_item": votes_per_item,
                       "guidelines": guidelines or []})

    async def admin_overview(request):
        return answer({"database": store.name, "votes_per_item": votes_per_item,
                       "tasks": await run_in_threadpool(overview, store, votes_per_item)})

    async def next_item(request):
        try:
            payload = _payload(await request.body(), {"task", "annotator"})
            task, annotator = payload["task"], payload["annotator"]
            item = await run_in_threadpool(store.next_item, task, annotator, votes_per_item)
            progress = await run_in_threadpool(store.progress, task, annotator, votes_per_item)
        except Refused as e:
            return answer({"error": str(e)}, e.status)
        return answer({"item": item, "progress": progress})

    async def vote(request):
        try:
            payload = _payload(await request.body(), {"task", "annotator", "item", "choice", "note", "session"})
            item_id = _field(payload, "item", int)
            choice = _field(payload, "choice", str)
            if choice not in CHOICES:
                raise Refused(400, f"field 'choice' must be one of {', '.join(CHOICES)}")
            note = _field(payload, "note", str, required=False) or ""
            if len(note) > MAX_NOTE:
                raise Refused(400, f"field 'note' holds {len(note)} characters, at most {MAX_NOTE}")
            session = session_id(payload, required=False)
            done = await run_in_threadpool(store.vote, item_id, payload["annotator"], choice, note.strip(),
                                           session=session)
            progress = await run_in_threadpool(store.progress, payload["task"], payload["annotator"], votes_per_item)
        except Refused as e:
            return answer({"error": str(e)}, e.status)
        return answer({"recorded": done["recorded"], "progress": progress})  # the label would unblind: not sent

    async def undo(request):
        try:
            payload = _payload(await request.body(), {"task", "annotator", "session"})
            session = session_id(payload, required=True)
            undone = await run_in_threadpool(store.undo, payload["task"], payload["annotator"], session)
            progress = await run_in_threadpool(store.progress, payload["task"], payload["annotator"], votes_per_item)
        except Refused as e:
            return answer({"error": str(e)}, e.status)
        return answer({**undone, "progress": progress})  # their own click and note: nothing that unblinds

    async def skip(request):
        try:
            payload = _payload(await request.body(), {"task", "annotator", "item", "session"})
            item_id = _field(payload, "item", int)
            session = session_id(payload, required=False)
            await run_in_threadpool(store.skip, item_id, payload["annotator"], session)
            progress = await run_in_threadpool(store.progress, payload["task"], payload["annotator"], votes_per_item)
        except Refused as e:
            return answer({"error": str(e)}, e.status)
        return answer({"progress": progress})

    routes = [Route("/", html("index.html")), Route("/overview", html("overview.html")), Route("/static/{name}", asset),
              Route("/api/status", status), Route("/api/overview", admin_overview),
              Route("/api/next", next_item, methods=["POST"]), Route("/api/vote", vote, methods=["POST"]),
              Route("/api/undo", undo, methods=["POST"]), Route("/api/skip", skip, methods=["POST"])]
    return Guard(Starlette(routes=routes), token=token, admin_token=admin_token or secrets.token_urlsafe(24),
                 loopback_only=loopback_only)


def page_url(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/#token={token}"


def overview_url(host: str, port: int, admin_token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/overview#token={admin_token}"


def check_admin_token(admin_token: str | None, token: str) -> str:
    """The overview's token: ``admin_token`` as given (at least :data:`MIN_TOKEN` characters, not the annotators'
    token), or a fresh random one."""
    if admin_token is None:
        return secrets.token_urlsafe(24)
    if len(admin_token) < MIN_TOKEN:
        raise ConfigError(f"--admin-token: at least {MIN_TOKEN} characters, got {len(admin_token)}; e.g. "
                          "python -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if hmac.compare_digest(admin_token.encode(), token.encode()):
        raise ConfigError("--admin-token is the annotators' --token: give the overview its own token, or leave "
                          "--admin-token out for a random one")
    return admin_token


def serve(store: AnnotationStore, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          admin_token: str | None = None, votes_per_item: int = 1, guidelines: list[dict] | None = None,
          announce=print) -> None:
    """Serve the page until interrupted (Ctrl-C): checks the address (:func:`check_bind`), binds, announces the
    annotators' URL with its token and the overview's with the admin token, then runs uvicorn on the bound
    socket."""
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError("preftune annotate needs its web extra: pip install 'preftune[annotate]'") from e
    check_port(port)
    token = check_bind(host, token)
    admin_token = check_admin_token(admin_token, token)
    app = create_app(store, token=token, admin_token=admin_token, votes_per_item=votes_per_item,
                     loopback_only=is_loopback(host), guidelines=guidelines)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _bind_error(host, port, e) from e
    sock.listen(128)
    port = sock.getsockname()[1]
    announce(f"annotating at {page_url(host, port, token)}  (Ctrl-C stops; votes are saved as they come)")
    announce(f"overview at {overview_url(host, port, admin_token)}  (read-only counts, for whoever runs the task: "
             "keep this token from annotators)")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none", http="h11",
                            server_header=False, timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[sock])


def _bind_error(host: str, port: int, err: OSError) -> ConfigError:
    """Why the server cannot listen on ``host:port``, and which option to change."""
    if isinstance(err, socket.gaierror):
        return ConfigError(f"--host {host}: not an address of this machine ({err.strerror}); give one of its "
                           "addresses or names, e.g. --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every "
                           "network interface)")
    if err.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"--host {host}: not an address of this machine; give one of its addresses, e.g. --host "
                           "127.0.0.1 (this machine only) or --host 0.0.0.0 (every network interface)")
    if err.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): ports below 1024 need administrator "
                           "rights; choose another --port, e.g. --port 8765")
    if err.errno == errno.EADDRINUSE:
        return ConfigError(f"cannot listen on {host}:{port}: the port is in use; choose another --port (0 picks a "
                           "free one)")
    return ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); check --host and --port")
