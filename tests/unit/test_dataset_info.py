"""dataset_info.json entries → DatasetSpec: LLaMA-Factory's meaning, rayft's strictness (no Ray)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from data_pipelines.dataset_info import (
    FORMAT_DEFAULTS,
    Columns,
    DatasetError,
    DatasetSpec,
    RowFormat,
    Tags,
    load_dataset_info,
    parse_entry,
    resolve_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
DEMO_FILES = {
    "identity": "identity.json",
    "alpaca_en_demo": "alpaca_en_demo.json",
    "dpo_en_demo": "dpo_en_demo.json",
    "kto_en_demo": "kto_en_demo.json",
    "c4_demo": "c4_demo.jsonl",
    "glaive_toolcall_en_demo": "glaive_toolcall_en_demo.json",
}
# Why LF's own registry has entries rayft refuses; every other entry must resolve.
ALLOWED_REFUSALS = (
    r"file not found: .*/data/\w+\.(json|txt)$",  # demo files the repo does not ship
    r"media columns \((images|videos|audios)(, \w+)*\) are not supported yet",
    # nectar_rm, orca_dpo_de: `ranking` without chosen/rejected columns (LF: KeyError None)
    r"`ranking: true` needs both `chosen` and `rejected`",
)


def _write(folder: Path, name: str, text: str = '[{"instruction": "a", "output": "b"}]') -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _parse(entry: Any, folder: Path, name: str = "demo") -> DatasetSpec:
    return parse_entry(name, entry, folder)


def test_every_llamafactory_entry_resolves_or_is_refused_for_a_stated_reason() -> None:
    info = load_dataset_info(DATA)
    assert len(info) == 104  # SOURCE.md said 106; the file holds 104 keys
    loaders: dict[str, int] = {}
    for name in info:
        try:
            spec = resolve_dataset(name, DATA)
        except DatasetError as err:
            assert any(re.search(p, str(err)) for p in ALLOWED_REFUSALS), str(err)
            assert f"`{name}`" in str(err)
            continue
        loaders[spec.loader] = loaders.get(spec.loader, 0) + 1
    assert loaders == {"hf_hub": 78, "ms_hub": 1, "json": 6}


@pytest.mark.parametrize(("name", "file_name"), sorted(DEMO_FILES.items()))
def test_demo_entries_resolve_to_the_repo_copy(name: str, file_name: str) -> None:
    spec = resolve_dataset(name, DATA)
    assert spec.loader == "json" and spec.files == (str((DATA / file_name).resolve()),)


def test_listed_columns_and_tags_replace_the_defaults_entirely() -> None:
    c4 = resolve_dataset("c4_demo", DATA).row_format
    assert c4.columns.prompt == "text"
    assert (c4.columns.query, c4.columns.response, c4.columns.messages) == (None, None, None)
    kto = resolve_dataset("kto_en_demo", DATA).row_format
    assert (kto.tags.role_tag, kto.tags.user_tag, kto.tags.assistant_tag) == (
        "role",
        "user",
        "assistant",
    )
    assert (kto.tags.observation_tag, kto.tags.function_tag, kto.tags.system_tag) == (None,) * 3
    assert kto.columns.kto_tag == "label"


def test_defaults_without_columns_or_tags() -> None:
    fmt = resolve_dataset("identity", DATA).row_format
    assert fmt == RowFormat()
    assert (fmt.columns.prompt, fmt.columns.query, fmt.columns.response) == (
        "instruction",
        "input",
        "output",
    )
    assert fmt.tags == Tags(
        role_tag="from",
        content_tag="value",
        user_tag="human",
        assistant_tag="gpt",
        observation_tag="observation",
        function_tag="function_call",
        system_tag="system",
    )
    dpo = resolve_dataset("dpo_en_demo", DATA).row_format
    assert dpo.ranking and dpo.formatting == "sharegpt" and dpo.tags == Tags()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("identity", "plain"),
        ("c4_demo", "plain"),
        ("dpo_en_demo", "pairwise"),
        ("kto_en_demo", "kto"),
    ],
)
def test_row_kind_tells_stages_what_rows_hold(name: str, kind: str) -> None:
    assert resolve_dataset(name, DATA).row_format.kind == kind


def test_openai_without_tags_uses_openai_names(tmp_path: Path) -> None:
    _write(tmp_path, "chat.jsonl", '{"messages": []}\n')
    fmt = _parse({"file_name": "chat.jsonl", "formatting": "openai"}, tmp_path).row_format
    assert fmt.columns.messages == "messages"
    assert (fmt.tags.role_tag, fmt.tags.content_tag, fmt.tags.observation_tag) == (
        "role",
        "content",
        "tool",
    )
    assert FORMAT_DEFAULTS["openai"] == (fmt.columns, fmt.tags)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"file_nmae": "a.json"}, "unknown key `file_nmae`.*did you mean `file_name`"),
        ({"file_name": "a.json", "colums": {}}, "unknown key `colums`.*did you mean `columns`"),
        ({"file_name": "a.json", "columns": {"promt": "q"}}, r"`columns.promt`: Extra inputs"),
        ({"file_name": "a.json", "tags": {"role": "r"}}, r"`tags.role`: Extra inputs"),
        ({"file_name": "a.json", "formatting": "chatml"}, "`formatting`: Input should be 'alpaca'"),
        ({"file_name": "a.json", "ranking": "yes"}, "`ranking`: Input should be a valid boolean"),
        ({"file_name": "a.json", "num_samples": 0}, "`num_samples`: Input should be greater"),
        (
            {"file_name": "a.json", "num_samples": "10"},
            "`num_samples`: Input should be a valid int",
        ),
        ({"file_name": "a.json", "columns": {"prompt": 3}}, "`columns.prompt`: Input should be"),
        ({"file_name": "a.json", "columns": ["prompt"]}, "`columns`: Input should be"),
        ({"file_name": "a.json", "columns": {"prompt": "q", "images": "img"}}, "media columns"),
        ({"file_name": "a.json", "ranking": True}, "needs both `chosen` and `rejected`"),
        (
            {"file_name": "a.json", "columns": {"prompt": "q", "chosen": "c", "rejected": "r"}},
            "only read with `ranking: true`",
        ),
        (
            {
                "file_name": "a.json",
                "ranking": True,
                "columns": {"prompt": "q", "chosen": "c", "rejected": "r", "kto_tag": "k"},
            },
            "exclude each other",
        ),
        ({"file_name": "a.json", "columns": {"prompt": "q", "kto_tag": "k"}}, "needs a `response`"),
        ({"file_name": "a.json", "columns": {"response": "r"}}, r"needs `columns.prompt` \(or"),
        (
            {"file_name": "a.json", "formatting": "sharegpt", "columns": {"tools": "t"}},
            "formatting `sharegpt` needs `columns.messages`",
        ),
        (
            {"file_name": "a.json", "formatting": "sharegpt", "tags": {"user_tag": "u"}},
            "needs `tags.role_tag`, `tags.content_tag`",
        ),
        (
            {
                "file_name": "a.json",
                "formatting": "sharegpt",
                "tags": {
                    "role_tag": "r",
                    "content_tag": "c",
                    "user_tag": "x",
                    "assistant_tag": "x",
                },
            },
            "`tags.user_tag` and `tags.assistant_tag` are both `x`",
        ),
        ({"file_name": "a.json", "subset": "en"}, "`subset` only applies to hub datasets"),
        ({"file_name": "a.json", "folder": "python"}, "`folder` only applies to hub datasets"),
        ({"file_name": "a.json", "split": "test"}, "local files have only the `train` split"),
        ({"file_name": 3}, "`file_name` must be a file or folder name"),
        ({"file_name": []}, "`file_name` must be a file or folder name"),
        ({"formatting": "alpaca"}, "give `file_name`, `hf_hub_url` or `ms_hub_url`"),
        ({"script_url": "my_script"}, "`script_url` sources are not supported yet"),
        ({"cloud_file_name": "s3://b/a.json"}, "`cloud_file_name` sources are not supported yet"),
        ({"om_hub_url": "org/ds"}, "`om_hub_url` sources are not supported yet"),
        ({"hf_hub_url": ""}, "hub URL must be a dataset id"),
        ("a.json", "the entry must be a JSON object"),
    ],
)
def test_bad_entries_are_one_clear_error_naming_the_dataset(
    tmp_path: Path, entry: Any, message: str
) -> None:
    _write(tmp_path, "a.json")
    with pytest.raises(DatasetError, match=message) as caught:
        _parse(entry, tmp_path, name="my_set")
    assert str(caught.value).startswith("dataset `my_set`")


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(DatasetError, match="close names: alpaca_en_demo"):
        resolve_dataset("alpaca_en_dmo", DATA)


def test_missing_dataset_info_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"no dataset_info.json in dataset_dir {tmp_path}"):
        resolve_dataset("x", tmp_path)


def test_missing_file_names_the_full_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"file not found: {tmp_path}/nope.json"):
        _parse({"file_name": "nope.json"}, tmp_path)


def test_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    _write(tmp_path, "a.xlsx")
    with pytest.raises(
        DatasetError, match=r"a.xlsx has an unsupported extension; use one of .json"
    ):
        _parse({"file_name": "a.xlsx"}, tmp_path)


def test_file_lists_keep_order_and_json_with_jsonl_is_one_type(tmp_path: Path) -> None:
    _write(tmp_path, "b.jsonl", '{"instruction": "a", "output": "b"}\n')
    _write(tmp_path, "a.json")
    spec = _parse({"file_name": ["b.jsonl", "a.json"]}, tmp_path)
    assert spec.loader == "json"
    assert spec.files == (str(tmp_path / "b.jsonl"), str(tmp_path / "a.json"))


def test_mixed_file_types_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "a.json")
    _write(tmp_path, "b.csv", "instruction,output\na,b\n")
    with pytest.raises(DatasetError, match=r"mixes file types: a.json \(json\), b.csv \(csv\)"):
        _parse({"file_name": ["a.json", "b.csv"]}, tmp_path)
    with pytest.raises(ValidationError, match="not `json` files"):
        DatasetSpec(
            name="x", loader="json", files=(str(tmp_path / "a.json"), str(tmp_path / "b.csv"))
        )


def test_a_folder_means_its_supported_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "parts"
    for name in ("02.jsonl", "01.json", "README.md", ".hidden.json", "_SUCCESS"):
        _write(folder, name)
    (folder / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        spec = _parse({"file_name": "parts"}, tmp_path)
    assert spec.files == (str(folder / "01.json"), str(folder / "02.jsonl"))
    assert "README.md" in caplog.text


def test_a_folder_without_data_files_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "docs", "README.md")
    with pytest.raises(DatasetError, match="holds no data files"):
        _parse({"file_name": "docs"}, tmp_path)


def test_a_folder_with_two_file_types_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "parts", "a.json")
    _write(tmp_path / "parts", "b.parquet", "")
    with pytest.raises(DatasetError, match="mixes file types"):
        _parse({"file_name": "parts"}, tmp_path)


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".arrow", ".txt", ".JSONL"])
def test_each_supported_extension_has_a_loader(tmp_path: Path, ext: str) -> None:
    _write(tmp_path, f"data{ext}", "")
    loader = _parse({"file_name": f"data{ext}"}, tmp_path).loader
    assert loader == {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}.get(
        ext, "json"
    )


def test_saved_hf_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}]).save_to_disk(str(saved))
    spec = _parse({"file_name": "saved"}, tmp_path)
    assert (spec.loader, spec.files) == ("hf_disk", (str(saved),))
    contents = spec.content_files()  # what a content hash must cover
    assert str(saved / "state.json") in contents and any(f.endswith(".arrow") for f in contents)
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"dev": datasets.Dataset.from_list([{"instruction": "a", "output": "b"}])}
    ).save_to_disk(str(splits))
    assert _parse({"file_name": "splits", "split": "dev"}, tmp_path).split == "dev"
    _write(tmp_path, "a.json")
    with pytest.raises(DatasetError, match="must be the only `file_name`"):
        _parse({"file_name": ["saved", "a.json"]}, tmp_path)


def test_hub_urls_win_over_files_and_hf_over_modelscope(tmp_path: Path) -> None:
    _write(tmp_path, "a.json")
    both = {"hf_hub_url": "org/ds", "ms_hub_url": "ms/ds", "file_name": "a.json"}
    spec = _parse({**both, "subset": "en", "split": "validation", "folder": "x"}, tmp_path)
    assert (spec.loader, spec.hub_id, spec.files) == ("hf_hub", "org/ds", ())
    assert (spec.subset, spec.split, spec.folder) == ("en", "validation", "x")
    assert _parse({"ms_hub_url": "ms/ds", "om_hub_url": "om/ds"}, tmp_path).loader == "ms_hub"
    assert _parse({"hf_hub_url": "org/ds", "om_hub_url": "om/ds"}, tmp_path).loader == "hf_hub"


def test_specs_are_frozen_and_picklable(tmp_path: Path) -> None:
    import pickle

    spec = resolve_dataset("dpo_en_demo", DATA)
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(ValidationError):
        spec.row_format.columns.prompt = "x"  # type: ignore[misc]
    assert Columns(history="h").prompt == "instruction"  # Python defaults stay LF's defaults


def test_repo_dataset_info_is_lf_registry_verbatim() -> None:
    ours = json.loads((DATA / "dataset_info.json").read_text())
    for name, file_name in DEMO_FILES.items():
        assert ours[name]["file_name"] == file_name
