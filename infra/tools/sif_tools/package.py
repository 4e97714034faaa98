"""`make package`: Lambda-ready layers, function folders and deterministic zips.

Everything is read from template.yaml: which layers there are and what goes in each (each
layer's ``Metadata.SifLayer``: ``Requirements``, a requirements file, or ``Packages``, source
folders), which function gets which (each function's ``Layers``, each layer's ``ContentUri``
``build/package/layers/<name>``), so every function is counted with *its* layers.

The third-party runtime layers are built for the Lambda runtime (CPython 3.12 on manylinux,
x86_64 or arm64), not for the interpreter running this script: pip fetches the target's
wheels with ``--platform/--python-version/--only-binary``, all runtime requirement files in
one resolution (their layers share one sys.path, so their versions must fit together). The
result is split by distribution: each goes to the first layer whose requirements reach it
(``runtime-base``: pydantic, pydantic-settings, powertools; ``runtime-ml``: onnxruntime,
tokenizers, numpy, Pillow and what only they need), so ``runtime-ml`` repeats nothing of
``runtime-base`` and a function that has it must have ``runtime-base`` too (checked). Then
each is trimmed to what the functions need at run time:

* distributions the Lambda runtime already provides (boto3, botocore, s3transfer), those
  never used at run time (see ``NOT_NEEDED_AT_RUNTIME``) and everything only they pulled
  in are left out;
* files no import needs go too: tests, type stubs, C headers and static libraries,
  console scripts, onnxruntime's offline tools and its C-API library, and any bytecode
  (pip's would be for this interpreter, not the target's).

``--compile-with PYTHON`` ships bytecode made by an interpreter of the target version
instead (faster cold starts, more bytes); ``--check-with PYTHON`` imports the result with
such an interpreter, the way Lambda lays it out: every layer together runs a tiny model,
then each function's code with only its own layers imports every package they hold.

Output under ``--out`` (default ``build/package``)::

    layers/runtime-base/python/  pydantic, pydantic-settings, powertools (every function)
    layers/runtime-ml/python/    onnxruntime, tokenizers, numpy, Pillow (functions that run models)
    layers/inference/python/     sif_inference: the inference core (AWS-free)
    layers/core/python/          sif_core: the application core
    layers/metering/python/      sif_metering
    functions/<code>/            each CodeUri folder's own package(s)
    zips/layer-<name>.zip, zips/function-<code>.zip
    sizes.json                   the sizes printed in the tables

The build fails (exit 1) when a function plus its layers exceeds ``--limit-mib`` unzipped
(Lambda's hard limit is 250 MiB). Models are not bundled: the functions load them from the
models bucket at run time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from sif_tools.template import Template

REPO_ROOT = Path(__file__).resolve().parents[3]
MIB = 1024 * 1024
DEFAULT_LIMIT_MIB = 150.0
LAMBDA_PYTHON = "3.12"

PLATFORMS: dict[str, tuple[str, ...]] = {
    "x86_64": ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"),
    "arm64": ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"),
}
MACHINES = {"x86_64": "x86_64", "arm64": "aarch64"}

# Distributions removed from the runtime layer, with the reason shown in the report.
LAMBDA_PROVIDED: dict[str, str] = {
    name: "provided by the Lambda runtime" for name in ("boto3", "botocore", "s3transfer")
}
NOT_NEEDED_AT_RUNTIME: dict[str, str] = {
    # tokenizers needs it only for Tokenizer.from_pretrained (a hub download); the
    # inference core loads tokenizer.json from the models bucket with Tokenizer.from_file.
    "huggingface-hub": "hub downloads only (Tokenizer.from_pretrained)",
    # Only onnxruntime's offline tools (quantization, transformers, tools) import these;
    # InferenceSession does not, and those subpackages are trimmed below.
    "protobuf": "onnxruntime offline tools only",
    "flatbuffers": "onnxruntime offline tools only",
}

# File-level trimming of the runtime layer, all relative to its python/ folder.
TRIM_DIR_NAMES = frozenset({"__pycache__", "tests"})
TRIM_SUFFIXES = (".pyc", ".pyo", ".pyi")
TRIM_PATHS = (
    "bin",  # console scripts (f2py, numpy-config, ...)
    "numpy/_core/include",  # C headers for building extensions
    "numpy/_core/lib",  # libnpymath.a, pkg-config files
    "numpy/f2py",  # Fortran wrapper generator
    "numpy/_pyinstaller",  # PyInstaller hooks
    "onnxruntime/tools",  # model conversion / ORT-format tools
    "onnxruntime/transformers",  # graph optimisation and benchmarking scripts
    "onnxruntime/quantization",  # offline quantization (done by `make models`)
    "onnxruntime/datasets",  # sample models for the docs
    "onnxruntime/backend",  # ONNX backend-test API (needs the onnx package)
)

# onnxruntime's C-API library (28 MiB, for C/C++ consumers): the Python extension holds
# the runtime statically and does not load it. Removed only while the extension does not
# name it, so a wheel that links it dynamically keeps it.
ORT_CAPI_DIR = "onnxruntime/capi"
ORT_C_LIBRARY = "libonnxruntime.so"
ORT_EXTENSION_GLOB = "onnxruntime_pybind11_state*.so"

JUNK_DIR_NAMES = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
JUNK_SUFFIXES = (".pyc", ".pyo")

# template.yaml's layers point their ContentUri here; the folder name is the artifact name.
LAYER_CONTENT_DIR = "build/package/layers"
TEMPLATE = "template.yaml"


def declared_layers(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """What goes in each layer, as template.yaml declares it in the layer's ``Metadata.SifLayer``:
    (third-party layers: artifact -> requirements file, in the template's order, which is the order
    the split fills them; first-party layers: artifact -> source folders copied into python/)."""
    requirements: dict[str, str] = {}
    sources: dict[str, tuple[str, ...]] = {}
    for lid, resource in Template(path=path).of_type("AWS::Serverless::LayerVersion").items():
        name = str(resource.get("Properties", {}).get("ContentUri", "")).rstrip("/").rsplit("/", 1)[-1]
        declared = resource.get("Metadata", {}).get("SifLayer", {})
        if "Requirements" in declared and "Packages" not in declared:
            requirements[name] = str(declared["Requirements"])
        elif "Packages" in declared and "Requirements" not in declared:
            sources[name] = tuple(str(folder) for folder in declared["Packages"])
        else:
            raise PackageError(f"{path.name}: {lid} declares neither Requirements nor Packages (or both)")
    return requirements, sources


# Third-party layers: artifact name -> requirements file. Installed in one resolution, then
# split: a distribution goes to the first layer here whose requirements reach it, so a later
# layer relies on the earlier ones (a function with runtime-ml must have runtime-base).
# First-party layers: artifact name -> source folders copied into its python/.

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class PackageError(RuntimeError):
    """A build step failed; the message says which and why."""


LAYER_REQUIREMENTS, LAYER_SOURCES = declared_layers(REPO_ROOT / TEMPLATE)
LAYERS = (*LAYER_REQUIREMENTS, *LAYER_SOURCES)


# --------------------------------------------------------------------------- functions and their layers


@dataclass(frozen=True)
class LambdaFunction:
    """One AWS::Serverless::Function of template.yaml as packaged: its code and its layers."""

    logical_id: str
    name: str  # the logical id without "Function", kebab-case: GpuJobEventsFunction -> gpu-job-events
    code: str  # its CodeUri folder's name: the function-<code> artifact (several functions may share it)
    code_uri: str  # as in the template, relative to the repository root
    handler: str
    layers: tuple[str, ...]  # layer artifact names, in the template's order


def function_name(logical_id: str) -> str:
    base = logical_id.removesuffix("Function") or logical_id
    return re.sub(r"(?<!^)(?=[A-Z])", "-", base).lower()


def template_functions(path: Path) -> dict[str, LambdaFunction]:
    """Every function of the template with the layer artifacts it uses, by ``function_name``.

    A layer must be one this build makes (its ContentUri ``build/package/layers/<name>``), and
    a function with a third-party layer must have every third-party layer before it (the split
    puts what they share in the earlier one)."""
    template = Template(path=path)
    layer_ids = template.of_type("AWS::Serverless::LayerVersion")
    artifacts: dict[str, str] = {}
    for lid, resource in layer_ids.items():
        uri = str(resource.get("Properties", {}).get("ContentUri", "")).rstrip("/")
        name = uri.rsplit("/", 1)[-1]
        if uri != f"{LAYER_CONTENT_DIR}/{name}" or name not in LAYERS:
            raise PackageError(f"{path.name}: {lid}'s ContentUri {uri!r} is not one of {LAYER_CONTENT_DIR}/{LAYERS}")
        artifacts[lid] = name
    functions: dict[str, LambdaFunction] = {}
    for lid, spec in template.functions().items():
        unknown = [ref for ref in spec.layers if ref not in artifacts]
        if unknown:
            raise PackageError(f"{path.name}: {lid} uses layers this build does not make: {unknown}")
        layers = tuple(artifacts[ref] for ref in spec.layers)
        third_party = list(LAYER_REQUIREMENTS)
        for i, layer in enumerate(third_party):
            missing = [earlier for earlier in third_party[:i] if earlier not in layers]
            if layer in layers and missing:
                raise PackageError(f"{path.name}: {lid} has the {layer} layer but not {missing}, which it relies on")
        code_uri = spec.code_uri.rstrip("/")
        fn = LambdaFunction(lid, function_name(lid), code_uri.rsplit("/", 1)[-1], code_uri, spec.handler, layers)
        functions[fn.name] = fn
    return functions


# --------------------------------------------------------------------------- distributions


@dataclass
class Distribution:
    """One installed distribution in a --target tree, read from its .dist-info."""

    name: str  # canonical
    version: str
    dist_info: Path
    requires: list[Requirement]
    files: list[Path]  # relative to the tree root, inside it, dist-info included

    def size(self, root: Path) -> int:
        return sum(_file_size(root / f) for f in self.files)


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def read_distributions(root: Path) -> dict[str, Distribution]:
    """Every distribution installed in ``root`` (a pip --target tree), by canonical name."""
    dists: dict[str, Distribution] = {}
    for dist_info in sorted(root.glob("*.dist-info")):
        meta = importlib.metadata.Distribution.at(dist_info)
        name = meta.metadata["Name"]
        if not name:
            continue
        files = {p.relative_to(root) for p in dist_info.rglob("*") if p.is_file()}
        # RECORD paths are relative to the tree; console scripts point outside it (../../bin)
        files.update(Path(str(f)) for f in meta.files or () if not str(f).startswith(("/", "..")))
        requires = [Requirement(r) for r in meta.requires or ()]
        dists[canonicalize_name(name)] = Distribution(
            canonicalize_name(name), meta.version, dist_info, requires, sorted(files)
        )
    return dists


def target_environment(python_version: str, arch: str) -> dict[str, str]:
    """PEP 508 marker values of the Lambda runtime (not of this machine)."""
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python_version}.0",
        "platform_python_implementation": "CPython",
        "platform_machine": MACHINES[arch],
        "platform_system": "Linux",
        "platform_release": "",
        "platform_version": "",
        "sys_platform": "linux",
        "os_name": "posix",
    }


def _applies(marker: Marker | None, env: Mapping[str, str], extras: Iterable[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


def read_requirements(path: Path) -> list[Requirement]:
    """The requirements of a requirements file, following ``-r`` includes (other pip
    options are for pip and skipped here)."""
    reqs: list[Requirement] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        option, _, value = line.partition(" ")
        if option in ("-r", "--requirement"):
            reqs += read_requirements(path.parent / value.strip())
        elif not line.startswith("-"):
            try:
                reqs.append(Requirement(line))
            except InvalidRequirement as exc:
                raise PackageError(f"{path}: cannot parse requirement {line!r}: {exc}") from exc
    return reqs


def needed_distributions(
    dists: Mapping[str, Distribution],
    roots: Iterable[Requirement],
    env: Mapping[str, str],
    excluded: Iterable[str],
) -> set[str]:
    """Names reachable from ``roots`` through Requires-Dist, never entering ``excluded``."""
    skip = {canonicalize_name(n) for n in excluded}
    needed: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    queue: list[tuple[str, frozenset[str]]] = [
        (canonicalize_name(r.name), frozenset(r.extras)) for r in roots if _applies(r.marker, env, ())
    ]
    while queue:
        name, extras = queue.pop()
        if name in skip or name not in dists or (name, extras) in seen:
            continue
        seen.add((name, extras))
        needed.add(name)
        for req in dists[name].requires:
            if _applies(req.marker, env, extras):
                queue.append((canonicalize_name(req.name), frozenset(req.extras)))
    return needed


def assign_layers(
    dists: Mapping[str, Distribution], requirements: Mapping[str, Sequence[Requirement]], env: Mapping[str, str]
) -> dict[str, str]:
    """Distribution name -> the first layer (in ``requirements``' order) whose requirements
    reach it; what the Lambda runtime provides or no function needs (and all only they pull
    in) is in none."""
    excluded = {**LAMBDA_PROVIDED, **NOT_NEEDED_AT_RUNTIME}
    owner: dict[str, str] = {}
    for layer, roots in requirements.items():
        for name in sorted(needed_distributions(dists, roots, env, excluded)):
            owner.setdefault(name, layer)
    return owner


def remove_distribution(root: Path, dist: Distribution) -> None:
    """Delete a distribution's files (from its RECORD) and its .dist-info."""
    for rel in dist.files:
        path = root / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
    shutil.rmtree(dist.dist_info, ignore_errors=True)
    prune_empty_dirs(root)


def move_distribution(root: Path, dist: Distribution, dest: Path) -> None:
    """Move a distribution's files (from its RECORD) and its .dist-info from ``root`` to the
    same relative paths under ``dest`` (folders shared with others, like a namespace, stay)."""
    for rel in dist.files:
        path = root / rel
        if path.is_file() or path.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            path.replace(dest / rel)
    shutil.rmtree(dist.dist_info, ignore_errors=True)
    prune_empty_dirs(root)


# --------------------------------------------------------------------------- trimming


@dataclass
class Trimmed:
    """What file-level trimming took out of a tree (paths relative to it)."""

    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def drop(self, root: Path, path: Path) -> None:
        rel = path.relative_to(root).as_posix()
        if path.is_dir() and not path.is_symlink():
            self.bytes += tree_size(path)
            self.dirs.append(rel)
            shutil.rmtree(path)
        else:
            self.bytes += path.lstat().st_size
            self.files.append(rel)
            path.unlink()


def trim_tree(root: Path) -> Trimmed:
    """Remove what no import needs (see TRIM_* and ORT_C_LIBRARY)."""
    trimmed = Trimmed()
    for path in onnxruntime_c_library(root):
        trimmed.drop(root, path)
    for rel in TRIM_PATHS:
        if (root / rel).exists():
            trimmed.drop(root, root / rel)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for d in [d for d in dirnames if d in TRIM_DIR_NAMES]:
            trimmed.drop(root, here / d)
            dirnames.remove(d)
        for f in filenames:
            if f.endswith(TRIM_SUFFIXES):
                trimmed.drop(root, here / f)
    prune_empty_dirs(root)
    return trimmed


def onnxruntime_c_library(root: Path) -> list[Path]:
    """libonnxruntime.so* when onnxruntime's Python extension does not reference it."""
    capi = root / ORT_CAPI_DIR
    extensions = sorted(capi.glob(ORT_EXTENSION_GLOB))
    needle = ORT_C_LIBRARY.encode()
    if not extensions or any(needle in ext.read_bytes() for ext in extensions):
        return []
    return sorted(capi.glob(ORT_C_LIBRARY + "*"))


def prune_empty_dirs(root: Path) -> None:
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        path = Path(dirpath)
        if path != root and not any(path.iterdir()):
            path.rmdir()


def copy_package(src: Path, dest: Path) -> None:
    """Copy a pure-Python package without bytecode and tool caches."""
    if not (src / "__init__.py").exists():
        raise PackageError(f"{src} is not a Python package (no __init__.py)")
    shutil.copytree(
        src,
        dest,
        ignore=shutil.ignore_patterns(*JUNK_DIR_NAMES, *(f"*{s}" for s in JUNK_SUFFIXES)),
    )


def copy_function(src: Path, dest: Path) -> None:
    """A function's code as its zip holds it: its packages and top-level modules."""
    packages = sorted(p for p in src.iterdir() if (p / "__init__.py").exists())
    modules = sorted(src.glob("*.py"))
    if not packages and not modules:
        raise PackageError(f"{src} holds no Python code")
    for package in packages:
        copy_package(package, dest / package.name)
    dest.mkdir(parents=True, exist_ok=True)
    for module in modules:
        shutil.copy2(module, dest / module.name)


# --------------------------------------------------------------------------- zips and sizes


def iter_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (symlinks followed), sorted by relative POSIX path."""
    found = [p for p in root.rglob("*") if p.is_file()]
    yield from sorted(found, key=lambda p: p.relative_to(root).as_posix())


def tree_size(root: Path) -> int:
    """Unzipped size as Lambda counts it: the sum of the files' sizes."""
    return sum(p.stat().st_size for p in iter_files(root))


def write_zip(root: Path, dest: Path) -> int:
    """Zip the contents of ``root`` reproducibly; returns the zip's size in bytes.

    Entries are sorted, dated 1980-01-01 and carry only 0644/0755 modes, so the same
    tree always gives the same bytes.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in iter_files(root):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=ZIP_EPOCH)
            info.create_system = 3  # Unix, so external_attr holds the mode
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as src, zf.open(info, "w") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
    tmp.replace(dest)
    return dest.stat().st_size


@dataclass
class Artifact:
    kind: str  # "layer" or "function"
    name: str
    path: Path
    zip_path: Path
    unzipped: int = 0
    zipped: int = 0


@dataclass
class DistributionSize:
    """A runtime distribution's unzipped bytes as installed and after trimming, and its layer."""

    version: str
    before: int
    after: int = 0
    layer: str = ""  # the third-party layer it went to
    removed: str = ""  # why, when the whole distribution was left out


@dataclass
class Report:
    python_version: str
    arch: str
    limit_mib: float
    functions: dict[str, LambdaFunction] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    distributions: dict[str, DistributionSize] = field(default_factory=dict)
    trimmed: dict[str, Trimmed] = field(default_factory=dict)  # by third-party layer

    def layer(self, name: str) -> Artifact:
        return self.artifacts[f"layer-{name}"]

    def function_totals(self) -> dict[str, dict[str, int]]:
        """Per function: its code's size, each of *its* layers', and the totals Lambda's limit applies to."""
        totals: dict[str, dict[str, int]] = {}
        for name, fn in self.functions.items():
            code = self.artifacts[f"function-{fn.code}"]
            layers = [self.layer(n) for n in fn.layers]
            totals[name] = {
                "unzipped": code.unzipped,
                "zipped": code.zipped,
                **{f"layer_{layer.name}": layer.unzipped for layer in layers},
                "total_unzipped": code.unzipped + sum(layer.unzipped for layer in layers),
                "total_zipped": code.zipped + sum(layer.zipped for layer in layers),
            }
        return totals

    def over_limit(self) -> list[str]:
        limit = self.limit_mib * MIB
        return [n for n, t in self.function_totals().items() if t["total_unzipped"] > limit]

    def to_json(self) -> dict[str, object]:
        functions = {
            name: {
                **t,
                "logical_id": self.functions[name].logical_id,
                "code": self.functions[name].code,
                "layers": list(self.functions[name].layers),
            }
            for name, t in self.function_totals().items()
        }
        return {
            "python_version": self.python_version,
            "arch": self.arch,
            "limit_bytes": int(self.limit_mib * MIB),
            "ok": not self.over_limit(),
            "layers": {n: {"unzipped": self.layer(n).unzipped, "zipped": self.layer(n).zipped} for n in LAYERS},
            "functions": functions,
            "runtime_distributions": {n: asdict(d) for n, d in sorted(self.distributions.items())},
            "trimmed": {n: asdict(t) for n, t in self.trimmed.items()},
        }


def mib(n: float) -> str:
    return f"{n / MIB:.2f}"


def format_report(report: Report) -> str:
    dists = report.distributions
    lines = [
        f"runtime layers, python{report.python_version} {report.arch} (MiB unzipped)",
        f"  {'distribution':<24}{'version':>14}{'before':>9}{'after':>9}  layer",
    ]
    for name in sorted(dists, key=lambda n: (-dists[n].before, n)):
        d = dists[name]
        after = f"{'-':>9}  removed: {d.removed}" if d.removed else f"{mib(d.after):>9}  {d.layer}"
        lines.append(f"  {name:<24}{d.version:>14}{mib(d.before):>9}{after}")
    before = sum(d.before for d in dists.values())
    after_all = sum(report.layer(n).unzipped for n in LAYER_REQUIREMENTS)
    lines.append(f"  {'total':<24}{'':>14}{mib(before):>9}{mib(after_all):>9}")
    for layer, t in report.trimmed.items():
        lines.append(f"  trimmed from {layer}: {len(t.dirs)} folders and {len(t.files)} files, {mib(t.bytes)} MiB")
    lines += ["", f"{'artifact':<24}{'unzipped':>10}{'zipped':>10}  (MiB)"]
    for art in report.artifacts.values():
        lines.append(f"{art.kind + ' ' + art.name:<24}{mib(art.unzipped):>10}{mib(art.zipped):>10}")
    width = max([len(n) for n in report.functions] + [len("function")]) + 2
    lines += [
        "",
        f"{'function':<{width}}{'own':>8}"
        + "".join(f"{'+' + n:>15}" for n in LAYERS)
        + f"{'total':>10}{'zipped':>10}  (MiB; target {report.limit_mib:g} unzipped; - : not its layer)",
    ]
    for name, tot in report.function_totals().items():
        ok = "ok" if tot["total_unzipped"] <= report.limit_mib * MIB else "OVER"
        lines.append(
            f"{name:<{width}}{mib(tot['unzipped']):>8}"
            + "".join(f"{mib(tot['layer_' + n]) if 'layer_' + n in tot else '-':>15}" for n in LAYERS)
            + f"{mib(tot['total_unzipped']):>10}{mib(tot['total_zipped']):>10}  {ok}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- smoke check

# What the Lambda runtime itself puts on sys.path (/var/runtime): boto3 and its deps.
LAMBDA_RUNTIME_MODULES = ("boto3", "botocore", "s3transfer", "dateutil", "six", "urllib3", "jmespath")

# Run by the target interpreter with -I -S -B: nothing but the stdlib, the functions, the
# layers and a stand-in for /var/runtime on sys.path, in Lambda's order. Every layer at once:
# what the functions that run models see.
SMOKE_SCRIPT = """
import importlib, importlib.util, io, json, os, sys
model, runtime_stub, *paths = sys.argv[1:]
sys.path[:0] = paths
sys.path.append(runtime_stub)
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
x = np.arange(6, dtype=np.float32).reshape(2, 3)
(y,) = sess.run(None, {"x": x})
assert np.allclose(y, x.sum(axis=1, keepdims=True) + np.array([1.0, 2.0], np.float32)), y
from tokenizers import Tokenizer, models, pre_tokenizers
tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok = Tokenizer.from_str(tok.to_str())
assert tok.encode("hello world !").ids == [1, 2, 0]
from PIL import Image
for fmt in ("PNG", "JPEG", "WEBP"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.format == fmt and np.asarray(img.convert("RGB")).shape == (8, 8, 3)
from pydantic import BaseModel
class Item(BaseModel):
    n: int
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import SqsModel
assert parse(event={"n": "3"}, model=Item).n == 3
Logger(service="smoke"); Metrics(namespace="smoke"); Tracer(service="smoke")
import aws_xray_sdk.core, jmespath, botocore
assert botocore.__file__.startswith(runtime_stub), botocore.__file__
for gone in ("huggingface_hub", "google.protobuf", "flatbuffers"):
    assert importlib.util.find_spec(gone.split(".")[0]) is None, gone
ours = [p.name for path in paths for p in os.scandir(path) if p.name.startswith("sif_")]
for name in ours:
    importlib.import_module(name)
print(json.dumps({"python": sys.version.split()[0], "onnxruntime": ort.__version__,
                  "numpy": np.__version__, "packages": sorted(ours)}))
"""

# Then each function alone, as its Lambda lays it out: its code and only its own layers on
# sys.path. Every third-party package and module of its layers must import (a layer split that
# left a dependency in a layer the function lacks fails here). Our own packages are imported
# too, but what they miss is reported as a warning: which of them a function's handler really
# imports at cold start, and that its layers provide all of it, is tests/unit/test_layers.py's
# check.
FUNCTION_SCRIPT = """
import importlib, json, os, sys
runtime_stub, *paths = sys.argv[1:]
sys.path[:0] = paths
sys.path.append(runtime_stub)
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")
def importable(e):
    return e.name.endswith(".py") or os.path.isfile(os.path.join(e.path, "__init__.py"))
names = sorted({
    e.name.removesuffix(".py") for path in paths for e in os.scandir(path)
    if not e.name.startswith(("_", ".")) and importable(e)
})
for name in names:
    if not name.startswith("sif_"):
        importlib.import_module(name)
warnings = {}
for name in names:
    if name.startswith("sif_"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            warnings[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"packages": len(names), "numpy": "numpy" in sys.modules, "warnings": warnings}))
"""


def write_tiny_model(path: Path) -> Path:
    """A two-node ONNX graph (y = x @ ones(3, 2) + [1, 2]); needs the dev-only onnx package."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [
            numpy_helper.from_array(np.ones((3, 2), np.float32), "w"),
            numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def lambda_runtime_stub(dest: Path) -> Path:
    """A stand-in for /var/runtime: links to this environment's boto3 and its dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in LAMBDA_RUNTIME_MODULES:
        origin = Path(str(importlib.import_module(name).__file__))
        src = origin.parent if origin.name == "__init__.py" else origin
        link = dest / src.name
        if not link.exists():
            link.symlink_to(src)
    return dest


def _run_check(python: str, script: str, args: Sequence[str], workdir: Path, what: str) -> dict[str, object]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "LANG": "C.UTF-8"}
    result = subprocess.run(
        [python, "-I", "-S", "-B", "-c", script, *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=workdir,
        timeout=300,
    )
    if result.returncode != 0:
        raise PackageError(f"smoke check ({what}) with {python} failed:\n{result.stderr[-4000:]}")
    summary: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def smoke_check(
    out: Path, python: str, workdir: Path, functions: Mapping[str, LambdaFunction] | None = None
) -> dict[str, object]:
    """Import the built layers with ``python`` as Lambda would: all of them together run a
    session on a tiny model, parse, tokenize, decode images; then each function's code with
    only its own layers imports every package they hold. Returns what the scripts report."""
    functions = functions if functions is not None else template_functions(REPO_ROOT / TEMPLATE)
    model = write_tiny_model(workdir / "smoke.onnx")
    stub = lambda_runtime_stub(workdir / "var-runtime")
    out = out.resolve()
    codes = sorted({fn.code for fn in functions.values()})
    paths = [out / "functions" / code for code in codes]
    paths += [out / "layers" / layer / "python" for layer in LAYERS]
    summary = _run_check(python, SMOKE_SCRIPT, [str(model), str(stub), *map(str, paths)], workdir, "all layers")
    alone: dict[str, object] = {}
    for name, fn in functions.items():
        paths = [out / "functions" / fn.code, *(out / "layers" / layer / "python" for layer in fn.layers)]
        alone[name] = _run_check(python, FUNCTION_SCRIPT, [str(stub), *map(str, paths)], workdir, name)
    return {**summary, "functions": alone}


def smoke_warnings(summary: Mapping[str, object]) -> list[str]:
    """The per-function checks' warnings: our packages that did not import with only that
    function's layers."""
    found: list[str] = []
    functions = summary.get("functions")
    for name, result in functions.items() if isinstance(functions, dict) else ():
        warnings = result.get("warnings") if isinstance(result, dict) else None
        for package, problem in warnings.items() if isinstance(warnings, dict) else ():
            found.append(f"{name}: {package} does not import with only its layers: {problem}")
    return found


# --------------------------------------------------------------------------- build


def pip_install_target(
    requirements: Sequence[Path], dest: Path, *, python_version: str, arch: str, cache_dir: Path
) -> None:
    """Install the target runtime's wheels (never this interpreter's) into ``dest``, every
    requirements file in one resolution."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        "--no-input",
        "--target",
        str(dest),
        "--implementation",
        "cp",
        "--python-version",
        python_version,
        "--only-binary=:all:",
        "--cache-dir",
        str(cache_dir),
        *[arg for p in PLATFORMS[arch] for arg in ("--platform", p)],
        *[arg for r in requirements for arg in ("-r", str(r))],
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PackageError(f"pip install for python{python_version} {arch} failed:\n{result.stderr}")


def build_runtime_layers(
    dests: Mapping[str, Path],
    *,
    requirements: Mapping[str, Path],
    staging: Path,
    python_version: str,
    arch: str,
    cache_dir: Path,
) -> tuple[dict[str, DistributionSize], dict[str, Trimmed]]:
    """pip-install the target's wheels for every layer's requirements into ``staging`` at once,
    move each needed distribution to the first layer (in ``requirements``' order) whose
    requirements reach it, leave the rest out, trim each layer's files."""
    pip_install_target(
        list(requirements.values()), staging, python_version=python_version, arch=arch, cache_dir=cache_dir
    )
    dists = read_distributions(staging)
    sizes = {name: DistributionSize(d.version, d.size(staging)) for name, d in dists.items()}
    reasons = {**LAMBDA_PROVIDED, **NOT_NEEDED_AT_RUNTIME}
    layer_reqs = {layer: read_requirements(path) for layer, path in requirements.items()}
    owner = assign_layers(dists, layer_reqs, target_environment(python_version, arch))
    for name, dist in dists.items():
        if name in owner:
            move_distribution(staging, dist, dests[owner[name]])
            sizes[name].layer = owner[name]
        else:
            sizes[name].removed = reasons.get(name, "only needed by removed distributions")
    shutil.rmtree(staging)
    trimmed: dict[str, Trimmed] = {}
    for layer, dest in dests.items():
        dest.mkdir(parents=True, exist_ok=True)
        trimmed[layer] = trim_tree(dest)
    for name, layer in owner.items():
        sizes[name].after = dists[name].size(dests[layer])
    return sizes, trimmed


def interpreter_version(python: str) -> str:
    result = subprocess.run(
        [python, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise PackageError(f"cannot run {python}: {result.stderr.strip()}")
    return result.stdout.strip()


def precompile(python: str, python_version: str, trees: Iterable[Path]) -> None:
    """Byte-compile with an interpreter of the target version.

    Layers are read-only in Lambda, so without shipped bytecode every cold start compiles
    every module it imports again (about 0.3 s for the runtime layer's imports on
    3.12). ``unchecked-hash`` pycs stay valid although the zips reset every mtime.
    """
    found = interpreter_version(python)
    if found != python_version:
        raise PackageError(f"{python} is Python {found}; bytecode must come from {python_version}")
    cmd = [python, "-I", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
    result = subprocess.run([*cmd, *map(str, trees)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PackageError(f"compileall with {python} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")


def build(
    out: Path,
    *,
    root: Path = REPO_ROOT,
    python_version: str = LAMBDA_PYTHON,
    arch: str = "x86_64",
    cache_dir: Path | None = None,
    limit_mib: float = DEFAULT_LIMIT_MIB,
    requirements: Mapping[str, Path] | None = None,
    compile_with: str | None = None,
) -> Report:
    """Build every layer and function folder under ``out`` and zip them; ``requirements``
    replaces the third-party layers' requirement files (default ``LAYER_REQUIREMENTS``)."""
    out = out.resolve()
    if out == root.resolve() or out in root.resolve().parents or out == Path(out.anchor):
        raise PackageError(f"refusing to clear {out}: choose a dedicated output folder")
    functions = template_functions(root / TEMPLATE)
    codes: dict[str, str] = {}
    for fn in functions.values():
        if codes.setdefault(fn.code, fn.code_uri) != fn.code_uri:
            raise PackageError(f"two CodeUri folders are both named {fn.code!r}: {codes[fn.code]}, {fn.code_uri}")
    if out.exists():
        shutil.rmtree(out)
    report = Report(python_version=python_version, arch=arch, limit_mib=limit_mib, functions=functions)
    zips = out / "zips"

    report.distributions, report.trimmed = build_runtime_layers(
        {layer: out / "layers" / layer / "python" for layer in LAYER_REQUIREMENTS},
        requirements=requirements or {layer: root / rel for layer, rel in LAYER_REQUIREMENTS.items()},
        staging=out / "pip-target",
        python_version=python_version,
        arch=arch,
        cache_dir=cache_dir or root / ".cache" / "pip-lambda",
    )
    for layer, sources in LAYER_SOURCES.items():
        for src in sources:
            copy_package(root / src, out / "layers" / layer / "python" / Path(src).name)
    for code, code_uri in sorted(codes.items()):
        copy_function(root / code_uri, out / "functions" / code)

    artifacts = [("layer", n, out / "layers" / n) for n in LAYERS]
    artifacts += [("function", code, out / "functions" / code) for code in sorted(codes)]
    if compile_with:
        precompile(compile_with, python_version, [path for _kind, _name, path in artifacts])
    for kind, name, path in artifacts:
        art = Artifact(kind, name, path, zips / f"{kind}-{name}.zip")
        art.unzipped = tree_size(path)
        art.zipped = write_zip(path, art.zip_path)
        report.artifacts[f"{kind}-{name}"] = art
    (out / "sizes.json").write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sif_tools.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "package")
    parser.add_argument("--arch", choices=sorted(PLATFORMS), default="x86_64")
    parser.add_argument(
        "--python-version",
        default=LAMBDA_PYTHON,
        help=f"target CPython version (default {LAMBDA_PYTHON}, the Lambda runtime)",
    )
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "pip-lambda")
    parser.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB)
    parser.add_argument(
        "--compile-with",
        metavar="PYTHON",
        help="an interpreter of the target version: ship its bytecode (faster cold starts, "
        "about 10%% more bytes); by default no bytecode is shipped",
    )
    parser.add_argument(
        "--check-with",
        metavar="PYTHON",
        help="an interpreter of the target version: import the built layers with it and run a "
        "tiny model, then each function with only its own layers (needs the dev-only onnx package here)",
    )
    args = parser.parse_args(argv)
    try:
        report = build(
            args.out,
            python_version=args.python_version,
            arch=args.arch,
            cache_dir=args.cache_dir,
            limit_mib=args.limit_mib,
            compile_with=args.compile_with,
        )
    except PackageError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.check_with:
        with tempfile.TemporaryDirectory(prefix="sif-smoke-") as tmp:
            try:
                summary = smoke_check(args.out, args.check_with, Path(tmp), report.functions)
            except PackageError as exc:
                print(f"package: {exc}", file=sys.stderr)
                return 1
        print(f"\nsmoke check passed: {json.dumps(summary)}")
        for warning in smoke_warnings(summary):
            print(f"package: warning: {warning}", file=sys.stderr)
    print(f"\nwrote {args.out / 'zips'} and {args.out / 'sizes.json'}")
    over = report.over_limit()
    if over:
        print(
            f"package: over the {report.limit_mib:g} MiB target (function + layers, unzipped): " + ", ".join(over),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
