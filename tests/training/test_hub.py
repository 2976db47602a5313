"""push_to_hub: refused at config time without a repository, fails at once (and clearly) when nothing could be
uploaded, and uploads final/ with its card as one commit. Nothing is ever sent to the Hub here: the tests run with
HF_HUB_OFFLINE=1 (tests/conftest.py) and either replace HfApi's network calls with recorders or run `preftune train`
against a stand-in of the Hub's HTTP API on 127.0.0.1 (HF_ENDPOINT)."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from preftune import train
from preftune.cli import main
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError, HubError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training import hub


def config(**values):
    return build_config({"push_to_hub": True, "hub_model_id": "me/my-dpo", **values})


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Offline mode off and no token anywhere (no HF_TOKEN, an empty HF home); HfApi's calls recorded, never sent."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    calls = []

    def refuse(name):
        def call(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            raise AssertionError(f"HfApi.{name} would reach the network")
        return call

    for name in ("whoami", "create_repo", "upload_folder"):
        monkeypatch.setattr(HfApi, name, refuse(name))
    return calls


def test_push_to_hub_needs_a_repository_at_config_time():
    with pytest.raises(ConfigError, match="push_to_hub: true needs hub_model_id"):
        build_config({"push_to_hub": True})
    with pytest.raises(ConfigError, match="is not a Hub repository id"):
        build_config({"hub_model_id": "a/b/c"})


def test_offline_mode_fails_at_once_before_training_and_after(tmp_path):
    cfg = config()
    start = time.perf_counter()
    with pytest.raises(HubError, match="offline mode is on.*HF_HUB_OFFLINE") as before:
        hub.check_push(cfg)
    with pytest.raises(HubError, match="offline mode is on") as after:
        hub.push_final(cfg, tmp_path / "final")
    assert time.perf_counter() - start < 5
    assert "push_to_hub: false" in str(before.value)
    # After training the message says where the model is and how to upload it by hand.
    assert f"hf upload me/my-dpo {tmp_path / 'final'}" in str(after.value)


def test_no_token_fails_before_any_request(online):
    with pytest.raises(HubError, match="no Hugging Face token.*HF_TOKEN"):
        hub.check_push(config())
    assert online == []


def test_token_comes_from_the_environment_or_the_config(online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub.resolve_token(config()) == "hf_from_env"
    assert hub.resolve_token(config(hub_token="hf_from_config")) == "hf_from_config"


def test_no_network_is_a_hub_error_naming_the_cause(online, monkeypatch):
    from huggingface_hub import HfApi

    def unreachable(self, *args, **kwargs):  # what huggingface_hub's HTTP client raises without a network
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "whoami", unreachable)
    with pytest.raises(HubError, match="Name or service not known.*could not be reached"):
        hub.check_push(config(hub_token="hf_x"))


def test_push_creates_the_repository_and_uploads_final_with_its_card(online, monkeypatch, tmp_path):
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "README.md").write_text("---\nlibrary_name: transformers\n---\n")
    (final / "model.safetensors").write_bytes(b"")
    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["create"] = (repo_id, kwargs, self.token)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        sent["upload"] = kwargs
        sent["files"] = sorted(p.name for p in final.iterdir())
        return CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc", commit_message="",
                          commit_description="", oid="abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    url = hub.push_final(config(hub_private_repo=True), final)
    assert url == "https://huggingface.co/me/my-dpo/commit/abc"
    repo_id, kwargs, token = sent["create"]
    assert (repo_id, kwargs["private"], kwargs["exist_ok"], token) == ("me/my-dpo", True, True, "hf_from_env")
    assert sent["upload"]["repo_id"] == "me/my-dpo" and sent["upload"]["folder_path"] == str(final)
    assert "README.md" in sent["files"]


def test_a_refused_token_says_so(online, monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    class Refused(Exception):
        response = type("Response", (), {"status_code": 403})()

    def create_repo(self, repo_id, **kwargs):
        raise Refused("403 Forbidden")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    with pytest.raises(HubError, match="token was refused.*write access"):
        hub.push_final(config(hub_token="hf_read_only"), tmp_path / "final")


def test_the_token_is_never_written_to_disk(tmp_path):
    cfg = config(hub_token="hf_secret")
    cfg.save(tmp_path / "config.yaml")
    assert "hf_secret" not in (tmp_path / "config.yaml").read_text()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["hub_token"] is None
    assert cfg.hub_token == "hf_secret"  # the run itself still has it


# ---- through a real run, against a stand-in of the Hub's HTTP API on loopback ---------------------------------------

WRITE_TOKEN, READ_TOKEN = "hf_stand_in_write", "hf_stand_in_read"


class StandInHub(ThreadingHTTPServer):
    """The Hub's HTTP API as huggingface_hub's upload path calls it: whoami-v2, repos/create, validate-yaml,
    preupload (every file "regular", so no LFS or Xet path is taken) and commit (an NDJSON of base64 files).
    Users own their own namespace only: creating a repository elsewhere is refused (403), as the Hub does."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.tokens = {WRITE_TOKEN: "write", READ_TOKEN: "read"}
        self.requests: list[tuple[str, str]] = []
        self.created: dict[str, dict] = {}  # repo id -> the create request's body
        self.commits: list[dict] = []  # {"repo", "summary", "files": {path: bytes}}


class _StandInHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _token_role(self) -> str | None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return self.server.tokens.get(token)

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        role = self._token_role()
        if self.path == "/api/whoami-v2":
            if role is None:
                return self._answer(401, {"error": "Invalid credentials in Authorization header"})
            return self._answer(200, {"type": "user", "name": "me", "orgs": [],
                                      "auth": {"type": "access_token", "accessToken": {"role": role}}})
        self._answer(404, {"error": "Repository not found"})

    def do_POST(self):
        self.server.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        role, hub = self._token_role(), self.server
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path == "/api/validate-yaml":
            return self._answer(200, {"errors": [], "warnings": []})
        if self.path == "/api/repos/create":
            request = json.loads(body)
            if role != "write" or request.get("organization") not in (None, "me"):
                return self._answer(403, {"error": "You don't have the rights to create a model under this namespace"})
            repo_id = f"{request.get('organization') or 'me'}/{request['name']}"
            hub.created[repo_id] = request
            return self._answer(200, {"url": f"{hub.url}/{repo_id}"})
        if parts[:2] == ["api", "models"] and parts[-2] in ("preupload", "commit"):
            repo_id = "/".join(parts[2:-2])
            if role != "write" or repo_id not in hub.created:
                return self._answer(403, {"error": "Forbidden"})
            if parts[-2] == "preupload":
                files = json.loads(body)["files"]
                return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                     "oid": None} for f in files]})
            items = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            assert all(item["key"] in ("header", "file") for item in items)  # nothing went through LFS
            hub.commits.append({"repo": repo_id, "summary": items[0]["value"]["summary"],
                                "files": {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                                          for item in items if item["key"] == "file"}})
            oid = f"{len(hub.commits):040x}"
            return self._answer(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                      "pullRequestUrl": None})
        self._answer(404, {"error": "not found"})


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """Offline mode off, HF_ENDPOINT at a stand-in Hub on 127.0.0.1, HF_TOKEN a write token the stand-in knows, no
    saved token. huggingface_hub's own default endpoint is a closed local port: a call that ignored HF_ENDPOINT
    would fail rather than reach the real Hub."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    hub = StandInHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()
    thread.join()


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A small preference file for the embedded default model, and a YAML that pushes its run."""
    root = tmp_path_factory.mktemp("hub")
    rows = builtin_preferences(8, seed=3)
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "run.yaml").write_text(
        f"dataset: {root / 'prefs.jsonl'}\nmax_steps: 1\nper_device_train_batch_size: 4\ndisable_tqdm: true\n"
        f"cache_dir: {root / 'cache'}\npush_to_hub: true\nhub_model_id: me/my-dpo\nhub_private_repo: true\n")
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_preftune_train_uploads_final_with_its_card(stand_in, user_files, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(user_files / "run.yaml"), f"output_dir={out}"]) == 0
    assert stand_in.created["me/my-dpo"]["visibility"] == "private"
    [commit] = stand_in.commits
    final = files_of(out / "final")
    assert {"model.safetensors", "tokenizer.json", "config.json", "README.md"} <= final.keys()
    assert commit["repo"] == "me/my-dpo" and commit["files"] == final  # every file of final/, byte for byte
    assert final["README.md"].startswith(b"---\n") and b"me/my-dpo" in final["README.md"]  # the model card
    assert commit["summary"] == "preftune: dpo (run)"


def stop_case(case: str, monkeypatch, user_files) -> tuple[list[str], str]:
    """Overrides and the environment of a run that cannot upload; what the message must say to do."""
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return [], r"offline mode is on \(HF_HUB_OFFLINE=1\).*unset HF_HUB_OFFLINE"
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        return [], "no Hugging Face token to upload to me/my-dpo; set the HF_TOKEN environment variable"
    if case == "read-only token":
        return [f"hub_token={READ_TOKEN}"], "token of me is read-only.*use a token with write access"
    nowhere = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", nowhere)
    return [], (r"checking the token for me/my-dpo failed \(ConnectError.*the Hub at " + re.escape(nowhere) +
                " could not be reached: check the network connection")


@pytest.mark.parametrize("case", ["offline", "no token", "read-only token", "unreachable"])
def test_a_run_that_could_not_upload_stops_before_its_first_step(case, stand_in, user_files, tmp_path, monkeypatch,
                                                                 capsys):
    overrides, advice = stop_case(case, monkeypatch, user_files)
    out = tmp_path / "run"
    start = time.perf_counter()
    code = main(["train", str(user_files / "run.yaml"), f"output_dir={out}", *overrides])
    assert code == HubError.exit_code
    assert time.perf_counter() - start < 10
    assert not out.exists()  # nothing was loaded, trained or written
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("preftune: push_to_hub: ") and re.search(advice, message)
    assert "or set push_to_hub: false" in message
    assert stand_in.created == {} and stand_in.commits == []


def test_a_failed_upload_after_training_keeps_final_and_says_how_to_upload_it(stand_in, user_files, tmp_path,
                                                                              capsys):
    out = tmp_path / "run"  # the token is valid, but another namespace refuses it: known only when uploading
    code = main(["train", str(user_files / "run.yaml"), f"output_dir={out}", "hub_model_id=their-org/my-dpo"])
    assert code == HubError.exit_code
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "creating the repository their-org/my-dpo failed (HfHubHTTPError" in message
    assert "the token was refused: use a token with write access to that namespace" in message
    assert f"the model is saved in {out / 'final'}: upload it later with `hf upload their-org/my-dpo {out / 'final'}`" \
        in message
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "README.md").is_file()
    assert json.loads((out / "summary.json").read_text())["final_dir"] == str(out / "final")
    assert stand_in.commits == []


def test_ppo_checks_the_push_before_its_first_update(stand_in, tmp_path, monkeypatch):
    """PPO trains in a loop of its own (training/ppo.py), behind the same train()."""
    monkeypatch.delenv("HF_TOKEN")
    tok = default_tokenizer(builtin_preferences(8, seed=3))
    with pytest.raises(HubError, match="no Hugging Face token"):
        train(config(method="ppo", max_steps=1, output_dir=str(tmp_path / "ppo"), disable_tqdm=True),
              model=build_tiny_model(tok, seed=0), tokenizer=tok, judge=lambda prompts, texts: [0.0] * len(texts))
    assert not (tmp_path / "ppo").exists()


def test_a_run_of_rounds_uploads_its_last_rounds_model_once(stand_in, tmp_path):
    rows = builtin_preferences(8, seed=3)
    tok = default_tokenizer(rows)
    out = tmp_path / "rounds"
    train(config(method="iterative_dpo", num_rounds=2, num_generations=2, max_completion_length=4, max_steps=1,
                 per_device_train_batch_size=4, output_dir=str(out), cache_dir=str(tmp_path / "cache"),
                 disable_tqdm=True, bf16=False),
          model=build_tiny_model(tok, seed=0), tokenizer=tok, train_dataset=rows,
          judge=lambda prompts, completions: [float(len(c)) for c in completions])
    [commit] = stand_in.commits
    assert commit["files"] == files_of(out / "round-2" / "final") == files_of(out / "final")
    assert commit["files"] != files_of(out / "round-1" / "final")
