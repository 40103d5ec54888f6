"""Authentication and tenancy over real gRPC: API keys, projects kept apart in
every service (datasets, jobs, adapters), admin-only operations, quotas."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from prometheus_client import REGISTRY

from tunewire.clients.sdk import ApiError, DatasetClient, InferenceClient, TrainingClient
from tunewire.services.common import auth
from tunewire.services.common.settings import SettingsError, load_settings
from tunewire.services.dataset.server import DatasetDeps
from tunewire.services.dataset.server import create_server as create_dataset_server
from tunewire.v1 import dataset_pb2, training_pb2

from conftest import ServerThread, free_port, prompt_completion_jsonl, three_services, write_lora_adapter


def test_keys_authenticate_until_revoked(tmp_path):
    path = tmp_path / "keys.json"
    alice, alice_entry = auth.new_key("alpha", auth.MEMBER)
    admin, admin_entry = auth.new_key("ops", auth.ADMIN)
    path.write_text(json.dumps({"keys": [alice_entry, admin_entry]}))
    ring = auth.KeyRing(path)
    assert ring.authenticate(alice) == auth.Caller("alpha", auth.MEMBER, alice_entry["id"])
    assert ring.authenticate(admin).is_admin
    assert alice not in path.read_text()  # only the hash is stored
    forged = alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")
    assert ring.authenticate(forged) is None
    assert ring.authenticate("not a key") is None
    path.write_text(json.dumps({"keys": [admin_entry]}))  # revoked, no restart
    assert ring.authenticate(alice) is None
    assert ring.authenticate(admin) is not None


def test_members_cannot_act_for_another_project():
    member = auth.Caller("alpha", auth.MEMBER, "k1")
    assert member.acting_for("") == member and member.acting_for("alpha") == member
    with pytest.raises(auth.PermissionDenied):
        member.acting_for("beta")
    # A project's admin is its own project's only; an operator acts for any.
    with pytest.raises(auth.PermissionDenied):
        auth.Caller("alpha", auth.ADMIN, "k2").acting_for("beta")
    assert auth.Caller("ops", auth.OPERATOR, "k3").acting_for("beta").project == "beta"


def test_serving_beyond_loopback_needs_keys(tmp_path):
    with pytest.raises(SettingsError, match="TUNEWIRE_API_KEYS_FILE"):
        load_settings(home=tmp_path, host="0.0.0.0")
    assert load_settings(home=tmp_path, host="127.0.0.1").api_keys_file is None
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    assert load_settings(home=tmp_path, host="0.0.0.0", api_keys_file=keys).host == "0.0.0.0"
    with pytest.raises(SettingsError, match="TLS needs both"):
        load_settings(home=tmp_path, tls_cert_file=keys)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """The three services with keys: projects alpha and beta (a member
    each), alpha's admin, an operator, and the services' own operator key,
    limited to the RPCs they call on each other."""
    tmp = tmp_path_factory.mktemp("auth")
    services_rpcs = auth.SERVICE_RPCS["orchestrator"] + auth.SERVICE_RPCS["inference"]
    keys = {
        name: auth.new_key(project, role, rpcs)
        for name, project, role, rpcs in (
            ("alpha", "alpha", auth.MEMBER, ()),
            ("beta", "beta", auth.MEMBER, ()),
            ("alpha-admin", "alpha", auth.ADMIN, ()),
            ("operator", "ops", auth.OPERATOR, ()),
            ("services", "ops", auth.OPERATOR, services_rpcs),
        )
    }
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps({"keys": [entry for _, entry in keys.values()]}))
    http_port = free_port()
    with three_services(
        tmp,
        tiny_model_dir,
        inference_http_port=http_port,
        api_keys_file=keys_file,
        service_api_key=keys["services"][0],
        project_max_active_jobs=2,
        project_max_dataset_bytes=100_000,
    ) as servers:
        yield {
            "addresses": {name: servers[name].address for name in ("dataset", "training", "inference")},
            "keys": {name: key for name, (key, _) in keys.items()},
            "model": str(tiny_model_dir),
            "tmp": tmp,
            "runner": servers["runner"],
            "openai_url": f"http://127.0.0.1:{http_port}/v1",
        }


def clients(stack, who: str | None, project: str = "", key: str = ""):
    key = stack["keys"][who] if who else key
    a = stack["addresses"]
    return (
        DatasetClient(a["dataset"], api_key=key, project=project),
        TrainingClient(a["training"], api_key=key, project=project),
        InferenceClient(a["inference"], timeout=60, api_key=key, project=project),
    )


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    return caught.value.code


def message_of(call, *args, **kwargs) -> str:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    return caught.value.message


def test_every_service_refuses_calls_without_a_valid_key(stack):
    refused = {"method": "/tunewire.v1.DatasetService/ListDatasets", "code": "UNAUTHENTICATED"}
    before = REGISTRY.get_sample_value("tunewire_rpc_requests_total", refused) or 0
    for key in ("", "tw_00000000_" + "x" * 43):
        datasets, training, inference = clients(stack, None, key=key)
        assert code_of(datasets.list) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(training.list_jobs) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(inference.generate, "hi", max_new_tokens=2) == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open to probes.
        inference.wait_until_serving(timeout=10)
    # Counted by method and code in the metrics.
    assert REGISTRY.get_sample_value("tunewire_rpc_requests_total", refused) == before + 2


def test_projects_see_only_their_own_datasets_jobs_and_adapters(stack):
    a_data, a_train, a_infer = clients(stack, "alpha")
    b_data, b_train, b_infer = clients(stack, "beta")
    content = prompt_completion_jsonl(12)
    ours = a_data.upload(content, name="shared-name").dataset
    assert ours.project == "alpha"

    # Beta can neither read, list, use nor delete it, and the errors are
    # those of an id that never existed.
    unknown = "ds-" + "0" * 24
    assert b_data.list() == [] and b_data.list(name="shared-name") == []
    for call in (b_data.get, b_data.report, b_data.delete):
        assert code_of(call, ours.id) == grpc.StatusCode.NOT_FOUND
        assert message_of(call, ours.id).replace(ours.id, "X") == message_of(call, unknown).replace(unknown, "X")
    assert code_of(lambda: list(b_data.rows(ours.id))) == grpc.StatusCode.NOT_FOUND
    assert code_of(b_train.create_job, stack["model"], ours.id) == grpc.StatusCode.NOT_FOUND
    # The same file is beta's own dataset, with another id.
    theirs = b_data.upload(content, name="shared-name")
    assert not theirs.already_existed and theirs.dataset.id != ours.id

    job = a_train.create_job(stack["model"], ours.id, idempotency_key="nightly")
    assert [j.id for j in a_train.list_jobs()] == [job.id]
    assert b_train.list_jobs() == []
    for call in (b_train.get_job, b_train.cancel_job, b_train.list_checkpoints):
        assert code_of(call, job.id) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(b_train.stream_events(job.id, timeout=10))) == grpc.StatusCode.NOT_FOUND
    # An idempotency key is the project's own: beta's "nightly" is a new job.
    beta_job = b_train.create_job(stack["model"], theirs.dataset.id, idempotency_key="nightly")
    assert beta_job.id != job.id

    list(a_train.stream_events(job.id, timeout=60))
    adapter_id = a_train.get_job(job.id).adapter_id
    assert adapter_id and [a.id for a in a_train.list_adapters()] == [adapter_id]
    assert adapter_id not in [a.id for a in b_train.list_adapters()]
    loaded = a_infer.wait_for_adapter(adapter_id, timeout=60)
    assert loaded.project == "alpha"
    assert a_infer.generate("hello", adapter=adapter_id, max_new_tokens=4).completion_tokens > 0
    # For beta the adapter does not exist.
    assert adapter_id not in [a.id for a in b_infer.loaded_adapters().adapters]
    for call in (b_infer.generate, lambda *a, **k: list(b_infer.generate_stream(*a, **k))):
        assert message_of(call, "hello", adapter=adapter_id, max_new_tokens=4).replace(adapter_id, "X") == message_of(
            call, "hello", adapter="ad-never", max_new_tokens=4
        ).replace("ad-never", "X")
    assert code_of(b_infer.classify, "hello", adapter=adapter_id) == grpc.StatusCode.NOT_FOUND
    # Nor can beta load it from the artifact store by its path: answered as a
    # path that holds nothing. Alpha may load its own under another name.
    uri = next(a.uri for a in a_train.list_adapters() if a.id == adapter_id)
    _, _, admin_for_beta = clients(stack, "operator", project="beta")
    _, _, admin_for_alpha = clients(stack, "operator", project="alpha")
    assert code_of(admin_for_beta.load_adapter, "stolen", uri) == grpc.StatusCode.INVALID_ARGUMENT
    never = uri.rsplit("/", 1)[0] + "/ad-never"
    assert message_of(admin_for_beta.load_adapter, "stolen", uri).replace(uri, "X") == message_of(
        admin_for_beta.load_adapter, "stolen", never
    ).replace(never, "X")
    assert admin_for_alpha.load_adapter("copy", uri).project == "alpha"
    assert code_of(b_data.delete, ours.id) == grpc.StatusCode.NOT_FOUND
    assert a_data.get(ours.id).id == ours.id  # still there


def test_the_openai_api_authenticates_and_keeps_projects_apart_as_grpc_does(stack):
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=stack["openai_url"], api_key=key, max_retries=0, timeout=60)

    _, _, for_alpha = clients(stack, "operator", project="alpha")
    for_alpha.load_adapter("alpha-bot", str(write_lora_adapter(stack["model"], stack["tmp"] / "own" / "alpha-bot", seed=11)))
    alpha, beta = client(stack["keys"]["alpha"]), client(stack["keys"]["beta"])
    assert "alpha-bot" in [m.id for m in alpha.models.list()]
    assert "alpha-bot" not in [m.id for m in beta.models.list()]
    assert alpha.completions.create(model="alpha-bot", prompt="hello", max_tokens=3).usage.completion_tokens > 0
    # For beta, alpha's adapter is a model that does not exist.
    with pytest.raises(openai.NotFoundError) as caught:
        beta.chat.completions.create(model="alpha-bot", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client("tw_00000000_" + "x" * 40).models.list()
    with pytest.raises(urllib.error.HTTPError) as caught:  # no key at all
        urllib.request.urlopen(stack["openai_url"] + "/models", timeout=30)
    assert caught.value.code == 401 and "no credentials" in json.loads(caught.value.read())["error"]["message"]
    # The services' key may call only the RPCs they need of each other.
    with pytest.raises(openai.PermissionDeniedError):
        client(stack["keys"]["services"]).completions.create(model=stack["model"], prompt="hello", max_tokens=3)


def test_the_cli_sends_the_key_given_before_its_command(stack, monkeypatch):
    from typer.testing import CliRunner

    from tunewire.clients.cli import app

    monkeypatch.delenv("TUNEWIRE_API_KEY", raising=False)
    jobs_list = ["jobs", "list", "--json", "--training-address", stack["addresses"]["training"]]
    refused = CliRunner().invoke(app, jobs_list)
    assert refused.exit_code == 5 and "UNAUTHENTICATED" in refused.stderr
    _, beta, _ = clients(stack, "beta")
    listed = CliRunner().invoke(app, ["--api-key", stack["keys"]["beta"], *jobs_list])
    assert listed.exit_code == 0 and [j["id"] for j in json.loads(listed.stdout).get("jobs", [])] == [j.id for j in beta.list_jobs()]


def test_a_jobs_pin_is_the_orchestrators_and_ends_with_the_job(stack):
    a_data, a_train, _ = clients(stack, "alpha")
    dataset = a_data.upload(prompt_completion_jsonl(12, start=500), name="pinned").dataset
    job = a_train.create_job(stack["model"], dataset.id)
    # A member can neither drop the job's pin nor add one of its own.
    unpin = dataset_pb2.UnpinDatasetRequest(dataset_id=dataset.id, holder=job.id)
    assert code_of(a_data._call, a_data.stub.UnpinDataset, unpin) == grpc.StatusCode.PERMISSION_DENIED
    pin = dataset_pb2.PinDatasetRequest(dataset_id=dataset.id, holder="mine")
    assert code_of(a_data._call, a_data.stub.PinDataset, pin) == grpc.StatusCode.PERMISSION_DENIED
    list(a_train.stream_events(job.id, timeout=60))  # the job ends
    # Then its pin goes, and the dataset can be deleted.
    deadline = time.monotonic() + 30
    while True:
        try:
            a_data.delete(dataset.id)
            break
        except ApiError as exc:
            assert exc.code == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() < deadline, exc.message
            time.sleep(0.2)
    assert code_of(a_data.get, dataset.id) == grpc.StatusCode.NOT_FOUND


def test_roles_members_project_admins_and_operators(stack, tiny_model_dir):
    _, a_train, a_infer = clients(stack, "alpha")
    _, admin_train, a_admin = clients(stack, "alpha-admin")
    own = stack["tmp"] / "own" / "manual"
    write_lora_adapter(tiny_model_dir, own, seed=5)
    # A member neither loads nor unloads adapters.
    assert code_of(a_infer.load_adapter, "manual", str(own)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(a_infer.unload_adapter, "anything") == grpc.StatusCode.PERMISSION_DENIED
    # No one but an operator acts for another project.
    _, b_as_alpha, _ = clients(stack, "beta", project="alpha")
    assert code_of(b_as_alpha.list_jobs) == grpc.StatusCode.PERMISSION_DENIED
    _, _, alpha_admin_as_beta = clients(stack, "alpha-admin", project="beta")
    assert code_of(alpha_admin_as_beta.load_adapter, "manual", str(own)) == grpc.StatusCode.PERMISSION_DENIED
    _, _, operator_for_beta = clients(stack, "operator", project="beta")
    assert operator_for_beta.load_adapter("manual", str(own)).project == "beta"
    _, _, b_infer = clients(stack, "beta")
    assert b_infer.generate("hello", adapter="manual", max_new_tokens=2).completion_tokens > 0
    assert code_of(a_infer.generate, "hello", adapter="manual", max_new_tokens=2) == grpc.StatusCode.NOT_FOUND
    # A project admin loads its own project's adapters, and can neither
    # replace nor unload another project's.
    assert a_admin.load_adapter("alpha-manual", str(own)).project == "alpha"
    assert code_of(a_admin.load_adapter, "manual", str(own)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(a_admin.unload_adapter, "manual") == grpc.StatusCode.NOT_FOUND
    assert b_infer.generate("hello", adapter="manual", max_new_tokens=2).completion_tokens > 0  # still beta's
    assert {a.project for a in a_admin.loaded_adapters().adapters} == {"alpha"}
    # WatchAdapters streams every project's adapters: operators only.
    for train in (a_train, admin_train):
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(train.stub.WatchAdapters(training_pb2.WatchAdaptersRequest(), timeout=5)))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _, _, operator = clients(stack, "operator")
    assert {"alpha", "beta"} <= {a.project for a in operator.loaded_adapters().adapters}
    a_admin.unload_adapter("alpha-manual")
    # The services' key calls what they call of each other (the jobs of these
    # tests pin datasets with it, the watcher follows adapters), and no more.
    services_data, services_train, services_infer = clients(stack, "services", project="alpha")
    try:
        next(iter(services_train.stub.WatchAdapters(training_pb2.WatchAdaptersRequest(), timeout=3)))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # admitted, with nothing published yet
    for call in (services_data.list, services_train.list_jobs, services_infer.loaded_adapters):
        assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED


def test_quotas_per_project(stack):
    data, training, _ = clients(stack, "alpha")
    _, beta_training, _ = clients(stack, "beta")
    with pytest.raises(ApiError) as caught:
        data.upload(prompt_completion_jsonl(6000), name="too-big")  # about 140 kB stored, over the 100 kB quota
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "TUNEWIRE_PROJECT_MAX_DATASET_BYTES" in caught.value.message
    assert "too-big" not in [d.name for d in data.list()]
    dataset = data.upload(prompt_completion_jsonl(12, start=500), name="small").dataset
    beta_dataset = clients(stack, "beta")[0].upload(prompt_completion_jsonl(12, start=900), name="b").dataset
    # Two queued or running jobs per project; the third waits for one to end.
    stack["runner"].release.clear()
    try:
        held = [training.create_job(stack["model"], dataset.id) for _ in range(2)]
        refused = code_of(training.create_job, stack["model"], dataset.id)
        other_project = beta_training.create_job(stack["model"], beta_dataset.id)  # another project's quota
    finally:
        stack["runner"].release.set()
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    for job in [*held, other_project]:
        client = beta_training if job.id == other_project.id else training
        list(client.stream_events(job.id, timeout=60))
    assert training.create_job(stack["model"], dataset.id).id


def _certificates(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunewire test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": tmp / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, serial in (("server", 2), ("client", 3)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tunewire {name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if name == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False,
            )
        files[name] = tmp / f"{name}.pem"
        files[f"{name}-key"] = tmp / f"{name}-key.pem"
        files[name].write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        files[f"{name}-key"].write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return files


def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(tmp_path):
    certs = _certificates(tmp_path)
    settings = load_settings(
        home=tmp_path / "home",
        tls_cert_file=certs["server"],
        tls_key_file=certs["server-key"],
        tls_client_ca_file=certs["ca"],
    )

    async def make_dataset():
        return await create_dataset_server(settings, DatasetDeps.from_settings(settings), port=0)

    with ServerThread(make_dataset) as server:
        address = f"127.0.0.1:{server.address.rsplit(':', 1)[1]}"
        with DatasetClient(
            address, tls_ca_file=certs["ca"], tls_client_cert_file=certs["client"], tls_client_key_file=certs["client-key"]
        ) as ok:
            assert ok.upload(prompt_completion_jsonl(4), name="over-tls").dataset.row_count == 4
        for refused in (
            DatasetClient(address, timeout=5, tls_ca_file=certs["ca"]),  # TLS, no client certificate
            DatasetClient(address, timeout=5),  # plaintext
        ):
            with refused, pytest.raises(ApiError) as caught:
                refused.list()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_requests_may_name_model_directories_only_under_the_model_roots(stack, tmp_path):
    datasets, training, _ = clients(stack, "alpha")
    dataset = datasets.upload(prompt_completion_jsonl(12, start=700), name="roots").dataset
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    messages = {}
    for path in (str(outside), str(tmp_path / "missing"), "/etc"):
        with pytest.raises(ApiError) as caught:
            training.create_job(path, dataset.id)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.violations[0].field == "spec.base_model"
        messages[path] = caught.value.message.replace(path, "X")
    assert len(set(messages.values())) == 1  # the same words whether the directory exists or not
    with pytest.raises(ApiError) as caught:
        datasets.upload(prompt_completion_jsonl(5), name="stats", token_stats_model=str(outside))
    assert caught.value.violations[0].field == "metadata.token_stats_model"
    assert training.create_job(stack["model"], dataset.id).id  # under the roots
