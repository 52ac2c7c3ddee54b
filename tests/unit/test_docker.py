"""The images in docker/, checked without a Docker engine.

They cannot be built here, so they are parsed the way Docker reads them (parser directives,
comments, line continuations, one instruction per logical line, ARGs before FROM) and checked
for what breaks a build or a cluster late: a base image whose Ray or Python is not the
project's, an ARG used in a stage that did not declare it, the install order of the README
(torch, or vLLM with its pinned torch, before the project), COPY sources that do not exist,
a .dockerignore that leaves out what the install needs or keeps in what the manifests forbid.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cluster import k8s

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}
JSON_FORMS = {"CMD", "ENTRYPOINT", "SHELL", "RUN", "VOLUME"}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[-+][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
BASE_TAG = re.compile(r"^(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)(?:-(?P<cuda>cu\d+))?$")


@dataclass(frozen=True)
class Instruction:
    """One logical line of a Dockerfile."""

    line: int
    name: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions as Docker's parser sees them; ValueError names the line of a mistake."""
    instructions: list[Instruction] = []
    buffer, start, directives_allowed = "", 0, True
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if directives_allowed and re.fullmatch(r"#\s*(syntax|escape|check)\s*=.*", stripped):
            if stripped.replace(" ", "").startswith("#escape=") and not stripped.endswith("\\"):
                raise ValueError(f"line {number}: only the default escape character is handled")
            continue
        directives_allowed = False
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments go, even inside a continuation
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        instructions.append(_instruction(start, buffer))
        buffer = ""
    if buffer:
        raise ValueError(f"line {start}: a continuation runs past the end of the file")
    if not instructions or instructions[0].name not in ("FROM", "ARG"):
        raise ValueError("a Dockerfile starts with FROM (or ARGs for FROM)")
    before_from = [i.name for i in instructions[: _first_from(instructions)]]
    if set(before_from) - {"ARG"}:
        raise ValueError("only ARG may come before the first FROM")
    return instructions


def _instruction(line: int, logical: str) -> Instruction:
    name, _, args = logical.partition(" ")
    name, args = name.upper(), args.strip()
    if name not in INSTRUCTIONS:
        raise ValueError(f"line {line}: unknown instruction `{name}`")
    if not args:
        raise ValueError(f"line {line}: {name} has no arguments")
    if "<<" in args and name in ("RUN", "COPY"):
        raise ValueError(f"line {line}: heredocs are not handled")
    if name in JSON_FORMS and args.startswith("["):
        try:
            words = json.loads(args)
        except json.JSONDecodeError as err:
            raise ValueError(f"line {line}: {name} in exec form is not JSON: {err}") from err
        if not all(isinstance(word, str) for word in words):
            raise ValueError(f"line {line}: {name} in exec form must be a list of strings")
    return Instruction(line, name, args)


def _first_from(instructions: list[Instruction]) -> int:
    return next(index for index, i in enumerate(instructions) if i.name == "FROM")


def _arg(instruction: Instruction) -> tuple[str, str | None]:
    name, sep, default = instruction.args.partition("=")
    return name.strip(), default.strip().strip('"') if sep else None


def _expand(text: str, values: dict[str, str | None]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if values.get(name) is None:
            raise ValueError(f"${name} has no value")
        return str(values[name])

    return VARIABLE.sub(value, text)


def base_image(instructions: list[Instruction]) -> str:
    """The FROM image with the ARG defaults declared before it."""
    index = _first_from(instructions)
    values = dict(_arg(i) for i in instructions[:index])
    return _expand(instructions[index].args.split()[0], values)


def scope_errors(instructions: list[Instruction]) -> list[str]:
    """Variables used after FROM must be declared there (ARG before FROM ends at FROM)."""
    declared: set[str] = set()
    errors = []
    for instruction in instructions[_first_from(instructions) + 1 :]:
        if instruction.name == "ARG":
            declared.add(_arg(instruction)[0])
        elif instruction.name == "ENV":
            declared |= {pair.split("=")[0] for pair in instruction.args.split()}
        for match in VARIABLE.finditer(instruction.args):
            name = match.group(1) or match.group(2)
            if name not in declared:
                errors.append(f"line {instruction.line}: ${name} is not declared in this stage")
    return errors


def _project() -> tuple[SpecifierSet, SpecifierSet]:
    # tomllib is 3.11+ and the project supports 3.10: read the two quoted values.
    text = (ROOT / "pyproject.toml").read_text()
    (ray,) = re.findall(r'"(ray\[[^"]*)"', text)
    (python,) = re.findall(r'^requires-python\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return Requirement(ray).specifier, SpecifierSet(python)


def base_image_errors(image: str, *, gpu: bool) -> list[str]:
    """The base is Ray's image for the project's Ray and a Python the project supports."""
    repository, _, tag = image.partition(":")
    if repository != "rayproject/ray":
        return [f"`{image}` is not rayproject/ray"]
    match = BASE_TAG.match(tag)
    if not match:
        return [f"tag `{tag}` is not <ray version>-py3<minor>[-cu<cuda>]"]
    ray_pin, python_pin = _project()
    errors = []
    if not ray_pin.contains(match["ray"]) or match["ray"] != k8s.RAY_VERSION:
        errors.append(f"Ray {match['ray']}: pyproject wants {ray_pin}, manifests {k8s.RAY_VERSION}")
    python = f"{match['major']}.{match['minor']}"
    if not python_pin.contains(f"{python}.0"):
        errors.append(f"Python {python}: pyproject wants {python_pin}")
    if gpu != bool(match["cuda"]):
        errors.append(f"`{tag}`: {'a CUDA' if gpu else 'a CPU'} image is wanted")
    return errors


def _dockerfile(flavour: str) -> list[Instruction]:
    return parse_dockerfile(DOCKERFILES[flavour].read_text())


def _runs(instructions: list[Instruction]) -> list[str]:
    return [i.args for i in instructions if i.name == "RUN"]


def _index(runs: list[str], pattern: str) -> int:
    (index,) = [n for n, run in enumerate(runs) if re.search(pattern, run)]
    return index


PROJECT_INSTALL = rf"pip install .*-e {re.escape(k8s.WORKDIR)}\b"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_parses(flavour: str) -> None:
    instructions = _dockerfile(flavour)
    assert [i.name for i in instructions].count("FROM") == 1
    assert scope_errors(instructions) == []


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_base_image_is_rays_for_the_projects_versions(flavour: str) -> None:
    image = base_image(_dockerfile(flavour))
    assert base_image_errors(image, gpu=flavour == "gpu") == []


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_layout_is_what_the_manifests_mount(flavour: str) -> None:
    instructions = _dockerfile(flavour)
    assert [i.args for i in instructions if i.name == "WORKDIR"] == [k8s.WORKDIR]
    (copy,) = [i.args.split() for i in instructions if i.name == "COPY"]
    assert copy[-1] == k8s.WORKDIR and copy[-2] == "."
    assert [i.args for i in instructions if i.name == "USER"][-1] == "ray"
    for flag in (word for word in copy if word.startswith("--chown=")):
        assert flag == "--chown=ray:users"  # pip -e writes metadata into the tree as ray


def test_cpu_image_installs_cpu_torch_first_as_the_readme() -> None:
    instructions = _dockerfile("cpu")
    runs = _runs(instructions)
    args = dict(_arg(i) for i in instructions if i.name == "ARG")
    readme = re.search(r"pip install torch==([\d.]+)", (ROOT / "README.md").read_text())
    assert readme and args["TORCH_VERSION"] == readme.group(1)
    assert args["TORCH_INDEX"].endswith("/whl/cpu")
    assert _index(runs, r'"torch==\$\{TORCH_VERSION\}"') < _index(runs, PROJECT_INSTALL)
    assert not any("vllm" in run for run in runs)


def test_gpu_image_installs_vllm_with_its_torch_before_the_project() -> None:
    instructions = _dockerfile("gpu")
    runs = _runs(instructions)
    args = dict(_arg(i) for i in instructions if i.name == "ARG")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["VLLM_VERSION"])  # pinned: it pins torch
    assert _index(runs, r'"vllm==\$\{VLLM_VERSION\}"') < _index(runs, PROJECT_INSTALL)
    assert not any("torch==" in run for run in runs)  # vLLM's torch, not a second one


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_images_check_ray_after_install_and_hold_no_secrets(flavour: str) -> None:
    instructions = _dockerfile(flavour)
    runs = _runs(instructions)
    assert _index(runs, PROJECT_INSTALL) < _index(runs, r"ray\.__version__ != '\$\{RAY_VERSION\}'")
    # The RayJob entrypoint's form is tried at build time (cluster/k8s.py runs `env -C`).
    assert _index(runs, PROJECT_INSTALL) < _index(runs, rf"env -C {re.escape(k8s.WORKDIR)} python")
    names = [_arg(i)[0] for i in instructions if i.name == "ARG"]
    names += [
        pair.split("=")[0] for i in instructions if i.name == "ENV" for pair in i.args.split()
    ]
    assert not [name for name in names if re.search(r"TOKEN|KEY|SECRET|PASSWORD", name)]


def _ignored(patterns: list[str], path: str) -> bool:
    return any(
        fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[0], pattern)
        for pattern in patterns
    )


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerignore_keeps_what_the_install_needs(flavour: str) -> None:
    ignore = DOCKERFILES[flavour].with_name(DOCKERFILES[flavour].name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in patterns if p.startswith("!")]  # _ignored does not do exceptions
    # What rendering refuses as "not in the image" is really left out, and outputs too.
    for name in (*k8s.IMAGE_EXCLUDED, k8s.SHARED_DIR):
        assert _ignored(patterns, name), name
    # pyproject's build needs these; jobs read data/ and configs/ by relative path.
    for needed in (
        "pyproject.toml",
        "README.md",
        "cluster/k8s.py",
        "jobs/train.py",
        "serve/app.py",
        "configs/schema.py",
        "data/dataset_info.json",
    ):
        assert (ROOT / needed).exists() and not _ignored(patterns, needed), needed


def test_parser_rejects_broken_dockerfiles() -> None:
    with pytest.raises(ValueError, match="line 2: unknown instruction `FORM`"):
        parse_dockerfile("ARG X=1\nFORM ubuntu\n")
    with pytest.raises(ValueError, match="runs past the end"):
        parse_dockerfile("FROM ubuntu\nRUN echo \\\n")
    with pytest.raises(ValueError, match="exec form is not JSON"):
        parse_dockerfile('FROM ubuntu\nCMD ["rayft", \n')
    with pytest.raises(ValueError, match="only ARG may come before"):
        parse_dockerfile("ARG X=1\nRUN true\nFROM ubuntu\n")
    with pytest.raises(ValueError, match="has no arguments"):
        parse_dockerfile("FROM ubuntu\nWORKDIR\n")
    parsed = parse_dockerfile("# syntax=docker/dockerfile:1\nFROM a\nRUN x \\\n  # note\n  y\n")
    assert [(i.line, i.name, i.args) for i in parsed] == [(2, "FROM", "a"), (3, "RUN", "x y")]


def test_checks_reject_wrong_versions_and_scopes() -> None:
    assert base_image_errors("rayproject/ray:2.60.0-py311", gpu=False) == []
    assert "Ray 2.59.0" in base_image_errors("rayproject/ray:2.59.0-py311", gpu=False)[0]
    assert "Python 3.9" in base_image_errors("rayproject/ray:2.60.0-py39", gpu=False)[0]
    assert "CUDA" in base_image_errors("rayproject/ray:2.60.0-py311", gpu=True)[0]
    assert "not rayproject/ray" in base_image_errors("python:3.11", gpu=False)[0]
    assert "tag" in base_image_errors("rayproject/ray:latest", gpu=False)[0]
    unscoped = parse_dockerfile("ARG V=1\nFROM img:${V}\nRUN echo ${V}\n")
    assert base_image(unscoped) == "img:1"
    assert scope_errors(unscoped) == ["line 3: $V is not declared in this stage"]
    with pytest.raises(ValueError, match=r"\$W has no value"):
        base_image(parse_dockerfile("FROM img:${W}\n"))
