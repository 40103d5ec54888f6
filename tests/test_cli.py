"""The `tunewire` command against a real dataset service."""

import json

import pytest
from typer.testing import CliRunner

from tunewire.clients import sdk
from tunewire.clients.cli import app
from tunewire.services.common.settings import load_settings
from tunewire.services.dataset.server import DatasetDeps, create_server

from conftest import ServerThread, free_port, prompt_completion_jsonl, write_lora_adapter

runner = CliRunner()


@pytest.fixture
def dataset_address(tmp_path):
    settings = load_settings(home=tmp_path / "home")

    async def make():
        return await create_server(settings, DatasetDeps.from_settings(settings), port=0)

    with ServerThread(make) as server:
        yield server.address


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["demo"],
        ["generate"],
        ["datasets", "upload"],
        ["datasets", "import"],
        ["jobs", "create"],
        ["jobs", "watch"],
        ["classify"],
        ["adapters", "load"],
        ["adapters", "download"],
        ["adapters", "get"],
        ["adapters", "merge"],
        ["adapters", "gguf"],
        ["jobs", "get"],
        ["datasets", "get"],
    ],
)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_upload_report_rows_and_delete(dataset_address, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(prompt_completion_jsonl(30))
    address = ["--dataset-address", dataset_address]
    result = runner.invoke(app, ["datasets", "upload", str(path), "--name", "sums", "--validation", "5", "--test", "0.1", *address])
    assert result.exit_code == 0, result.output
    dataset_id = result.output.split()[1].rstrip(":")
    assert "'validation': 5" in result.output and "'test': 3" in result.output and "quality report" in result.output
    rows = runner.invoke(app, ["datasets", "rows", dataset_id, "--limit", "2", "--split", "validation", *address])
    assert rows.exit_code == 0 and rows.output.count('"split": "validation"') == 2
    assert dataset_id in runner.invoke(app, ["datasets", "list", *address]).output
    got = runner.invoke(app, ["datasets", "get", dataset_id, "--json", *address])
    assert got.exit_code == 0 and json.loads(got.stdout)["id"] == dataset_id and json.loads(got.stdout)["row_count"] == "30"
    # The name defaults to the file's.
    renamed = tmp_path / "support-tickets.v2.jsonl"
    renamed.write_bytes(prompt_completion_jsonl(12, start=100))
    uploaded = runner.invoke(app, ["datasets", "upload", str(renamed), *address])
    assert uploaded.exit_code == 0
    named = runner.invoke(app, ["datasets", "list", "--name", "support-tickets", *address], terminal_width=200).output
    assert uploaded.output.split()[1].rstrip(":")[:20] in named
    assert runner.invoke(app, ["datasets", "delete", dataset_id, *address]).exit_code == 0
    # An id that is not there: the error on stderr, its own exit code, nothing on stdout.
    missing = runner.invoke(app, ["datasets", "get", "ds-" + "0" * 24, "--json", *address])
    assert missing.exit_code == 3 and "NOT_FOUND" in missing.stderr and missing.stdout == ""


def test_a_service_that_is_down_is_said_plainly_with_its_exit_code():
    down = runner.invoke(app, ["jobs", "list", "--training-address", f"127.0.0.1:{free_port()}"])
    assert down.exit_code == 7 and "UNAVAILABLE" in down.stderr and "is the service running" in down.stderr
    assert "Traceback" not in down.output
    bogus = runner.invoke(app, ["jobs", "estimate", "--dataset", "ds-x", "--method", "bogus"])
    assert bogus.exit_code == 2 and "use one of lora, full, qlora" in bogus.output


def test_generated_text_is_printed_verbatim(monkeypatch):
    class Part:
        def __init__(self, text):
            self.text_delta = text

    class FakeInference:  # the text a model may produce, which rich would read as markup
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def generate_stream(self, prompt, **kwargs):
            return iter([Part("[INST] hi [/INST]"), Part(" [bold]x[/] :smile:")])

    monkeypatch.setattr(sdk, "InferenceClient", FakeInference)
    result = runner.invoke(app, ["generate", "hello"])
    assert result.exit_code == 0 and result.stdout == "[INST] hi [/INST] [bold]x[/] :smile:\n"


def test_a_rejected_upload_exits_4_naming_the_rows(dataset_address, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n')
    result = runner.invoke(app, ["datasets", "upload", str(path), "--name", "bad", "--dataset-address", dataset_address])
    assert result.exit_code == 4 and result.stdout == ""
    assert "INVALID_ARGUMENT" in result.stderr and "row 1.completion: missing required field" in result.stderr


def test_adapters_load_list_classify_and_unload(tmp_path, tiny_model_dir):
    from tunewire.services.inference.server import InferenceDeps
    from tunewire.services.inference.server import create_server as create_inference_server

    settings = load_settings(home=tmp_path / "home", base_model=str(tiny_model_dir), import_roots=str(tmp_path / "adapters"))
    write_lora_adapter(tiny_model_dir, tmp_path / "adapters" / "reviews", classes=2)

    async def make():
        return await create_inference_server(settings, InferenceDeps(InferenceDeps.from_settings(settings).manager, ""), port=0)

    with ServerThread(make) as server:
        address = ["--inference-address", server.address]
        loaded = runner.invoke(app, ["adapters", "load", "reviews", str(tmp_path / "adapters" / "reviews"), *address])
        assert loaded.exit_code == 0 and "SEQ_CLS, rank 4" in loaded.output, loaded.output
        listed = runner.invoke(app, ["adapters", "list", *address], terminal_width=200)
        assert "reviews" in listed.output and "SEQ_CLS" in listed.output
        classified = runner.invoke(app, ["classify", "hello world", "--adapter", "reviews", *address])
        assert classified.exit_code == 0 and "LABEL_0" in classified.output and "LABEL_1" in classified.output
        refused = runner.invoke(app, ["adapters", "load", "other", "/etc", *address])
        assert refused.exit_code == 4 and "INVALID_ARGUMENT" in refused.stderr and "source_uri" in refused.stderr
        assert runner.invoke(app, ["adapters", "unload", "reviews", *address]).exit_code == 0
        gone = runner.invoke(app, ["classify", "hello", "--adapter", "reviews", *address])
        assert gone.exit_code == 3 and "NOT_FOUND" in gone.stderr


def test_keys_create_list_revoke_and_the_created_key_works(tmp_path, monkeypatch):
    from tunewire.services.common.auth import KeyRing

    keys = tmp_path / "keys.json"
    created = runner.invoke(app, ["keys", "create", "--project", "support", "--role", "member", "--file", str(keys)])
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    assert key.startswith("tw_") and key not in keys.read_text()  # shown once, stored as a hash
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    caller = KeyRing(keys).authenticate(key)
    assert (caller.project, caller.role) == ("support", "member")
    listed = runner.invoke(app, ["keys", "list", "--file", str(keys)])
    assert caller.key_id in listed.output and "support" in listed.output
    assert runner.invoke(app, ["keys", "create", "--project", "Bad Name!", "--file", str(keys)]).exit_code != 0
    assert runner.invoke(app, ["keys", "revoke", caller.key_id, "--file", str(keys)]).exit_code == 0
    assert KeyRing(keys).authenticate(key) is None
    assert runner.invoke(app, ["keys", "revoke", caller.key_id, "--file", str(keys)]).exit_code == 1
    # A service's key is limited to the RPCs that service calls.
    created = runner.invoke(app, ["keys", "create", "--project", "ops", "--role", "operator", "--for", "inference", "--file", str(keys)])
    assert created.exit_code == 0, created.output
    scoped = KeyRing(keys).authenticate(created.output.strip().splitlines()[-1])
    assert scoped.rpcs == ("tunewire.v1.TrainingService/WatchAdapters",)
    assert "WatchAdapters" in runner.invoke(app, ["keys", "list", "--file", str(keys)]).output
    for bad in (["--for", "dataset"], ["--rpc", "not an rpc"]):
        refused = runner.invoke(app, ["keys", "create", "--project", "ops", *bad, "--file", str(keys)])
        assert refused.exit_code != 0 and ("dataset" in refused.output or "not an RPC name" in refused.output)


def test_a_client_only_install_says_what_to_install_for_the_servers(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "ray") else find_spec(name, *a))
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 1 and '"tunewire[server]"' in result.stderr and "torch, ray missing" in result.stderr


def test_every_option_of_every_command_says_what_it_is():
    import typer

    missing = []

    def walk(command, path):
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, [*path, name])
        missing.extend((" ".join(path), p.opts[0]) for p in command.params if p.param_type_name == "option" and not p.help)

    walk(typer.main.get_command(app), [])
    assert missing == []
