"""push_to_hub: refused at config time without a repository, fails at once (and clearly) when nothing could be
uploaded, and uploads final/ with its card as one commit. Nothing is ever sent to the Hub here: the tests run with
HF_HUB_OFFLINE=1 (tests/conftest.py) and replace HfApi's network calls with recorders."""

from __future__ import annotations

import time

import pytest
import yaml

from preftune.config import build_config
from preftune.errors import ConfigError, HubError
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
