"""DatasetService over a real gRPC server on port 0, through the SDK: every
file format and row shape, every kind of bad row, splits, report, reads,
deletion and imports."""

import base64
import csv
import gzip
import io
import json

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunewire.clients.sdk import ApiError, DatasetClient
from tunewire.services.common.settings import load_settings
from tunewire.services.dataset.server import DatasetDeps, create_server
from tunewire.v1 import dataset_pb2

from conftest import DATABASES, ServerThread, prompt_completion_jsonl

F = dataset_pb2

# Every test here runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.parametrize("database_env", DATABASES, indirect=True)


@pytest.fixture(autouse=True)
def _database(database_env):
    return database_env


@pytest.fixture
def service(tmp_path, tiny_model_dir):
    imports = tmp_path / "imports"
    imports.mkdir()
    settings = load_settings(
        home=tmp_path / "home", max_upload_bytes=300_000, max_row_bytes=2_000, import_roots=str(imports), model_roots=str(tiny_model_dir)
    )

    async def make():
        return await create_server(settings, DatasetDeps.from_settings(settings), port=0)

    with ServerThread(make) as server, DatasetClient(server.address, timeout=60) as client:
        yield client, settings, imports


def rejected(client, data, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        client.upload(data, name=kwargs.pop("name", "bad"), **kwargs)
    return caught.value


def stored_dataset_dirs(settings):
    root = settings.home / "artifacts" / "datasets"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def classification_rows(n=60):
    return [{"text": f"review number {i} was {'great' if i % 3 else 'awful'}", "label": "pos" if i % 3 else "neg"} for i in range(n)]


# Formats and shapes


def test_upload_stores_parquet_with_three_splits(service):
    client, settings, _ = service
    response = client.upload(prompt_completion_jsonl(50), name="sums", split={"validation_fraction": 0.2, "test_fraction": 0.1})
    d = response.dataset
    assert d.id.startswith("ds-") and not response.already_existed
    assert d.format == F.DATASET_FORMAT_PROMPT_COMPLETION
    assert dict(d.split_row_counts) == {"train": 35, "validation": 10, "test": 5}
    table = pq.read_table(d.uri)
    assert table.num_rows == 50 and set(table.column_names) == {"prompt", "completion", "split"}
    assert client.get(d.id) == d
    assert [x.id for x in client.list("sums")] == [d.id]
    assert response.report.split_row_counts == d.split_row_counts


def test_the_same_rows_in_any_file_format_are_the_same_version(service):
    client, _, _ = service
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)]
    text = jsonl(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, ["prompt", "completion"])
    writer.writeheader()
    writer.writerows(rows)
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    ids = {
        client.upload(text, name="v", file_name="d.jsonl").dataset.id,
        client.upload(gzip.compress(text), name="v", file_name="d.jsonl.gz").dataset.id,
        client.upload(out.getvalue().encode(), name="v", file_name="d.csv").dataset.id,
        client.upload(gzip.compress(out.getvalue().encode()), name="v").dataset.id,  # sniffed
        client.upload(parquet.getvalue(), name="v").dataset.id,
        client.upload(iter([text[:5], text[5:]]), name="v", file_format=F.FILE_FORMAT_JSONL).dataset.id,
    }
    assert len(ids) == 1
    assert client.upload(text, name="other-name").already_existed
    assert [d.id for d in client.list("other-name")] == list(ids)


@pytest.mark.parametrize(
    "rows, fmt",
    [
        (classification_rows(), F.DATASET_FORMAT_CLASSIFICATION),
        ([{"document": f"long text {i} " * 5, "summary": f"text {i}"} for i in range(30)], F.DATASET_FORMAT_SUMMARIZATION),
        ([{"text": f"domain sentence {i}"} for i in range(30)], F.DATASET_FORMAT_TEXT),
        (
            [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "arr"}]} for i in range(30)],
            F.DATASET_FORMAT_CHAT,
        ),
    ],
)
def test_each_row_shape_is_detected_and_stored(service, rows, fmt):
    client, _, _ = service
    d = client.upload(jsonl(rows), name="shape").dataset
    assert d.format == fmt and d.row_count == len(rows)
    assert [dict(r, split=None) | {"split": None} for r in client.rows(d.id)][0].keys() >= set(rows[0])


def test_chat_from_csv_and_column_mapping(service):
    client, _, _ = service
    messages = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["conversation", "other"])
    writer.writerows([[messages, "x"]] * 3)
    d = client.upload(out.getvalue().encode(), name="c", file_name="chat.csv", column_mapping={"messages": "conversation"}).dataset
    assert d.format == F.DATASET_FORMAT_CHAT
    assert next(client.rows(d.id))["messages"][1] == {"role": "assistant", "content": "arr"}
    mapped = client.upload(
        jsonl([{"question": "q", "answer": "a"}] * 2), name="m", column_mapping={"prompt": "question", "completion": "answer"}
    ).dataset
    assert mapped.format == F.DATASET_FORMAT_PROMPT_COMPLETION


# Errors: each kind names the row, the field and the reason


@pytest.mark.parametrize(
    "data, kwargs, field, reason",
    [
        (b'{"prompt": "a", "completion": "b"}\n{oops\n', {}, "row 2", "invalid JSON"),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', {}, "row 2.completion", "missing required field"),
        (b'{"prompt": "a", "completion": 7}\n', {}, "row 1.completion", "must be a string, got number"),
        (b'{"prompt": "  ", "completion": "b"}\n', {}, "row 1.prompt", "must not be empty"),
        (b'{"prompt": "\xff", "completion": "b"}\n', {}, "row 1", "not valid UTF-8"),
        (b"prompt,completion\nok,\xff\xfe\n", {"file_name": "d.csv"}, "row 1.completion", "not valid UTF-8"),
        (b'{"messages": [{"role": "pirate", "content": "x"}]}\n', {}, "row 1.messages[0].role", "unknown role"),
        (b'{"messages": [{"role": "user", "content": "x"}]}\n', {}, "row 1.messages", "no assistant message"),
        (b'{"text": "t", "label": "maybe"}\n', {"labels": ["yes", "no"]}, "row 1.label", "not one of the declared labels"),
        (b'{"prompt": "' + b"x" * 3000 + b'", "completion": "b"}\n', {}, "row 1", "over 2000 bytes"),
        (b'{"prompt": "a", "completion": "b", "split": "holdout"}\n', {}, "row 1.split", "is not a split"),
        (b"prompt,completion\na,b,c\n", {"file_name": "d.csv"}, "row 1", "cells"),
        (b'{"nothing": "useful"}\n', {}, "row 1", "cannot tell the format"),
    ],
)
def test_bad_rows_are_rejected_whole_naming_row_field_and_reason(service, data, kwargs, field, reason):
    client, settings, _ = service
    error = rejected(client, data, **kwargs)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations[0].field == field and reason in error.violations[0].description
    assert "nothing stored" in error.message
    assert client.list() == [] and stored_dataset_dirs(settings) == []


@pytest.mark.parametrize(
    "data, kwargs, field, reason",
    [
        (b"\n \n", {}, "file", "empty"),
        (jsonl([{"text": "a", "label": "x"}] * 30), {}, "label", "at least two labels"),
        (prompt_completion_jsonl(5), {"split": {"validation_fraction": 0.05}}, "metadata.split.validation_fraction", "would be empty"),
        (prompt_completion_jsonl(5), {"split": {"validation_fraction": 0.9}}, "metadata.split.validation_fraction", "must be in [0, 0.5]"),
        (b"\x1f\x8bnot really gzip", {}, "file", "not a valid gzip stream"),
        (b"PAR1garbage", {"file_name": "x.parquet"}, "file", "not a readable Parquet file"),
        (prompt_completion_jsonl(3), {"name": "../etc"}, "metadata.name", "required"),
        (prompt_completion_jsonl(3), {"column_mapping": {"question": "q"}}, "metadata.column_mapping[question]", "not a tunewire field"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), {}, "file", "binary data"),
        (b'prompt,completion\na,b\n"x,y\nz,w\n', {"file_name": "d.csv", "drop_invalid_rows": True}, "file", "never closed"),
        (gzip.compress(b'{"prompt": "a", "completion": "b"}\n' * 20_000), {}, "file", "decompressed"),
    ],
)
def test_datasets_that_cannot_be_used_are_clear_errors(service, data, kwargs, field, reason):
    client, settings, _ = service
    error = rejected(client, data, **kwargs)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations[0].field == field and reason in error.violations[0].description
    assert stored_dataset_dirs(settings) == []


def test_errors_are_capped_but_counted(service):
    client, _, _ = service
    error = rejected(client, b"bad\n" * 45, file_name="bad.jsonl")
    assert len(error.violations) == 20 and "45 bad row(s)" in error.message


def test_upload_over_the_size_limit_is_resource_exhausted(service):
    client, settings, _ = service
    error = rejected(client, prompt_completion_jsonl(8000))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "TUNEWIRE_MAX_UPLOAD_BYTES" in error.message
    assert stored_dataset_dirs(settings) == []


def test_drop_invalid_rows_keeps_the_good_ones_and_reports_the_rest(service):
    client, _, _ = service
    data = prompt_completion_jsonl(30) + b'{"prompt": ""}\nnot json\n'
    response = client.upload(data, name="dropping", drop_invalid_rows=True)
    assert response.dataset.row_count == 30
    assert response.report.dropped_rows == 2
    assert [(p.row, p.field) for p in response.report.dropped_examples] == [(31, "prompt"), (32, "")]
    assert response.report.fields[0].empty_rows == 1
    assert any("dropped" in w for w in response.report.warnings)


# Splits


def test_splits_are_seeded_reproducible_and_stratified(service):
    client, _, _ = service
    data = jsonl(classification_rows(90))
    spec = {"validation_fraction": 0.2, "test_fraction": 0.2, "seed": 1}
    first = client.upload(data, name="s", split=spec).dataset
    again = client.upload(data, name="s", split=spec).dataset
    other_seed = client.upload(data, name="s", split={**spec, "seed": 2}).dataset
    assert first.id == again.id and first.id != other_seed.id
    assert list(first.labels) == ["neg", "pos"]
    by_split = {}
    for row in client.rows(first.id):
        by_split.setdefault(row["split"], []).append(row["label"])
    # 30 neg / 60 pos: every split keeps the 1:2 ratio.
    for split in ("validation", "test"):
        assert by_split[split].count("neg") == 6 and by_split[split].count("pos") == 12
    counted = client.upload(data, name="s", split={"validation_count": 7, "test_count": 0}).dataset
    assert dict(counted.split_row_counts) == {"train": 83, "validation": 7, "test": 0}


def test_a_split_column_is_honoured(service):
    client, _, _ = service
    rows = [{"prompt": f"q{i}", "completion": "a", "split": ["train", "validation", "test"][i % 3]} for i in range(9)]
    d = client.upload(jsonl(rows), name="given").dataset
    assert dict(d.split_row_counts) == {"train": 3, "validation": 3, "test": 3}
    error = rejected(client, jsonl(rows + [{"prompt": "x", "completion": "y"}]))
    assert error.violations[0].field == "split" and "no split" in error.violations[0].description


def test_identical_rows_never_straddle_splits(service):
    client, _, _ = service
    rows = [{"prompt": f"q{i % 10}", "completion": "a"} for i in range(100)]
    d = client.upload(jsonl(rows), name="dups", split={"validation_fraction": 0.3}).dataset
    splits_of = {}
    for row in client.rows(d.id):
        splits_of.setdefault(row["prompt"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())


def test_rows_sharing_an_answer_are_held_out_evenly(service):
    """16 facts asked three ways: the 10 held-out rows come from 10 different
    facts, so every fact keeps two phrasings in train (a random cut loses
    whole facts); answers that do not repeat split as before."""
    client, _, _ = service
    rows = [{"prompt": f"question {way} about fact {fact}?", "completion": f"answer {fact}"} for fact in range(16) for way in range(3)]
    d = client.upload(jsonl(rows), name="facts", split={"validation_count": 5, "test_count": 5}).dataset
    in_train = {}
    for row in client.rows(d.id):
        in_train[row["completion"]] = in_train.get(row["completion"], 0) + (row["split"] == "train")
    assert dict(d.split_row_counts) == {"train": 38, "validation": 5, "test": 5}
    assert sorted(in_train.values()) == [2] * 10 + [3] * 6
    unique = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    d = client.upload(jsonl(unique), name="unique", split={"validation_count": 4, "test_count": 4}).dataset
    assert dict(d.split_row_counts) == {"train": 32, "validation": 4, "test": 4}


# Quality report


def test_quality_report(service, tiny_model_dir):
    client, _, _ = service
    rows = classification_rows(60) + [classification_rows(60)[1]] * 3 + [{"text": "REVIEW number 1 was GREAT!!", "label": "pos"}]
    response = client.upload(
        jsonl(rows), name="q", split={"validation_fraction": 0.2, "test_fraction": 0.2}, token_stats_model=str(tiny_model_dir)
    )
    report = response.report
    assert report.row_count == 64 and report.exact_duplicate_rows == 3 and report.near_duplicate_rows == 1
    assert dict(report.label_counts) == {"neg": 20, "pos": 44}
    assert report.imbalance_ratio == pytest.approx(2.2)
    text = next(f for f in report.fields if f.field == "text")
    assert text.chars.min > 0 and text.chars.max >= text.chars.p95 >= text.chars.p50 > 0
    assert text.tokens.max > 0 and report.token_model == str(tiny_model_dir) and report.token_context == 256
    assert any("duplicates" in w for w in report.warnings)
    assert client.report(response.dataset.id) == report


def test_leakage_between_train_and_test_is_reported(service):
    client, _, _ = service
    # Near-duplicates (case and punctuation differ) can land on both sides of a cut.
    rows = [{"prompt": f"Question {i}", "completion": "Answer."} for i in range(40)] + [
        {"prompt": f"question {i}!", "completion": "answer"} for i in range(40)
    ]
    report = client.upload(jsonl(rows), name="leak", split={"test_fraction": 0.25}).report
    assert report.rows_leaked_from_train["test"] > 0
    assert any("also appear in train" in w for w in report.warnings)


# Reads, deletion, imports


def test_rows_page_and_stream(service):
    client, _, _ = service
    d = client.upload(prompt_completion_jsonl(45), name="rows").dataset
    seen, token = [], ""
    while True:
        page = client.list_rows(d.id, page_size=10, page_token=token)
        seen += [r.index for r in page.rows]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(45))
    assert len(list(client.rows(d.id))) == 45
    assert {r["split"] for r in client.rows(d.id, split="validation")} == {"validation"}
    with pytest.raises(ApiError) as caught:
        client.list_rows(d.id, page_token="garbage!")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_pinned_dataset_cannot_be_deleted(service):
    client, settings, _ = service
    d = client.upload(prompt_completion_jsonl(5), name="del").dataset
    client.stub.PinDataset(F.PinDatasetRequest(dataset_id=d.id, holder="job-1"))
    with pytest.raises(ApiError) as caught:
        client.delete(d.id)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "job-1" in caught.value.message
    client.stub.UnpinDataset(F.UnpinDatasetRequest(dataset_id=d.id, holder="job-1"))
    client.delete(d.id)
    with pytest.raises(ApiError) as caught:
        client.get(d.id)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert stored_dataset_dirs(settings) == [] and client.list("del") == []


def test_page_tokens_and_holders_that_no_column_holds_are_invalid_arguments(service):
    client, _, _ = service
    d = client.upload(prompt_completion_jsonl(5), name="p").dataset
    for token in ("!!!", base64.urlsafe_b64encode(b"-4").decode(), base64.urlsafe_b64encode(b"9" * 40).decode(), "\u00e9"):
        with pytest.raises(ApiError) as caught:
            client.list_rows(d.id, page_token=token)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.violations[0].field == "page_token"
    # On PostgreSQL a holder wider than its column was a DataError, answered INTERNAL.
    with pytest.raises(ApiError) as caught:
        client._call(client.stub.PinDataset, F.PinDatasetRequest(dataset_id=d.id, holder="j" * 300))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.violations[0].field == "holder"


# Races: requests at once on the same content


def at_once(*calls):
    """Runs the calls together; returns each one's result or ApiError."""
    from concurrent.futures import ThreadPoolExecutor

    def outcome(call):
        try:
            return call()
        except ApiError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(outcome, calls))


def test_the_same_upload_twice_at_once_stores_one_version(service):
    client, settings, _ = service
    content = prompt_completion_jsonl(300, start=7000)
    for attempt in range(3):
        results = at_once(*[lambda: client.upload(content, name="twice")] * 3)
        assert all(not isinstance(r, ApiError) for r in results), results
        assert len({r.dataset.id for r in results}) == 1
        assert sum(not r.already_existed for r in results) == (1 if attempt == 0 else 0)
    [stored] = stored_dataset_dirs(settings)
    assert sorted(p.name for p in (settings.home / "artifacts" / "datasets" / stored).iterdir()) == ["data.parquet", "report.json"]
    assert len(list(client.rows(results[0].dataset.id))) == 300


def test_a_delete_racing_a_reupload_never_leaves_a_dataset_without_its_rows(service):
    client, _, _ = service
    content = prompt_completion_jsonl(200, start=9000)
    dataset_id = client.upload(content, name="churn").dataset.id
    for _ in range(6):
        at_once(lambda: client.delete(dataset_id), lambda: client.upload(content, name="churn"))
        if any(d.id == dataset_id for d in client.list("churn")):
            assert len(list(client.rows(dataset_id))) == 200  # listed means readable


def test_the_byte_quota_holds_for_uploads_at_once(tmp_path, tiny_model_dir):
    settings = load_settings(home=tmp_path / "home", project_max_dataset_bytes=25_000)

    async def make():
        return await create_server(settings, DatasetDeps.from_settings(settings), port=0)

    with ServerThread(make) as server, DatasetClient(server.address) as client:
        one = client.upload(prompt_completion_jsonl(400, start=0), name="probe").dataset.size_bytes
        client.delete(client.list("probe")[0].id)
        assert 25_000 / 3 < one < 25_000 / 2  # two fit, a third does not
        results = at_once(*[lambda i=i: client.upload(prompt_completion_jsonl(400, start=1000 * (i + 1)), name=f"q{i}") for i in range(4)])
        stored = [r for r in results if not isinstance(r, ApiError)]
        assert len(stored) == 2 and sum(d.size_bytes for d in client.list()) <= 25_000
        assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in results if isinstance(r, ApiError))


def test_imports_read_only_under_the_configured_roots(service, tmp_path):
    client, _, imports = service
    (imports / "data.jsonl").write_bytes(prompt_completion_jsonl(12))
    d = client.import_dataset(str(imports / "data.jsonl"), name="imported").dataset
    assert d.row_count == 12
    assert client.import_dataset(f"file://{imports}/data.jsonl", name="imported").already_existed
    (tmp_path / "secret.jsonl").write_bytes(prompt_completion_jsonl(3))
    # fsspec reads `A::B` as the local file A chained over B: refused, not read.
    chained = f"{imports}/../secret.jsonl::memory://"
    for outside in (str(tmp_path / "secret.jsonl"), f"{imports}/../secret.jsonl", chained, f"http://localhost/{imports}/data.jsonl"):
        with pytest.raises(ApiError) as caught:
            client.import_dataset(outside, name="x")
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.violations[0].field == "source_uri"
    with pytest.raises(ApiError) as caught:
        client.import_dataset(str(imports), name="x")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "directory" in caught.value.violations[0].description
    with pytest.raises(ApiError) as caught:
        client.import_dataset(str(imports / "missing.jsonl"), name="x")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_a_slow_store_does_not_stall_the_other_rpcs(tmp_path):
    """Database and artifact-store calls run off the event loop: while one
    request waits on a slow store, health checks (what Kubernetes probes)
    and other requests are answered."""
    import threading
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = load_settings(home=tmp_path / "home")
    deps = DatasetDeps.from_settings(settings)
    fast_get, slow = deps.store.get, threading.Event()

    def get(dataset_id):
        if dataset_id.startswith("ds-slow"):
            slow.set()
            time.sleep(3)
        return fast_get(dataset_id)

    deps.store.get = get

    async def make():
        return await create_server(settings, deps, port=0)

    with ServerThread(make) as server, DatasetClient(server.address) as client:
        waiting = threading.Thread(target=lambda: pytest.raises(ApiError, client.get, "ds-slow"), daemon=True)
        waiting.start()
        assert slow.wait(10)
        health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert client.list() == []  # another request, answered meanwhile
        waiting.join(10)


def test_health_and_reflection(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    client, _, _ = service
    health = health_pb2_grpc.HealthStub(client.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="tunewire.v1.DatasetService")).status == health_pb2.HealthCheckResponse.SERVING
    )
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert "tunewire.v1.DatasetService" in {s.name for r in responses for s in r.list_services_response.service}
