"""`make package` (sif_tools.package): dependency pruning, trimming, zips, size accounting.

All but the last test work on fake trees and need no network. The last one builds the
real runtime layers for *this* interpreter (the Lambda build targets 3.12, which cannot be
imported here), trimmed by the same rules, and imports it as Lambda would.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sif_tools import package as pkg

REPO = Path(__file__).resolve().parents[2]


def make_dist(
    root: Path,
    name: str,
    version: str = "1.0",
    requires: tuple[str, ...] = (),
    files: dict[str, bytes] | None = None,
) -> None:
    """A fake installed distribution in a pip --target tree: its files and a dist-info."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n\nlong description: Requires-Dist: nope\n")
    record = [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,", f"../../bin/{name}-cli,sha256=x,3"]
    for rel, data in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record.append(f"{rel},sha256=x,{len(data)}")
    (info / "RECORD").write_text("\n".join(record) + "\n")


ENV_312 = pkg.target_environment("3.12", "x86_64")


# --------------------------------------------------------------------------- distributions


def test_needed_distributions_follows_extras_and_target_markers(tmp_path: Path) -> None:
    make_dist(tmp_path, "app", requires=("lib[fast]", 'old-backport; python_version < "3.11"'))
    make_dist(tmp_path, "lib", requires=('speedups; extra == "fast"', 'slowpath; extra == "slow"'))
    make_dist(tmp_path, "speedups", requires=('armonly; platform_machine == "aarch64"',))
    for name in ("old-backport", "slowpath", "armonly"):
        make_dist(tmp_path, name)
    dists = pkg.read_distributions(tmp_path)

    needed = pkg.needed_distributions(dists, [Requirement("app")], ENV_312, excluded=())
    assert needed == {"app", "lib", "speedups"}
    arm = pkg.target_environment("3.12", "arm64")
    assert "armonly" in pkg.needed_distributions(dists, [Requirement("app")], arm, excluded=())
    py310 = pkg.target_environment("3.10", "x86_64")
    assert "old-backport" in pkg.needed_distributions(dists, [Requirement("app")], py310, excluded=())


def test_excluded_distributions_take_their_orphans_but_not_shared_deps(tmp_path: Path) -> None:
    # like aws-xray-sdk -> botocore -> urllib3, with jmespath also wanted by powertools
    make_dist(tmp_path, "powertools", requires=("jmespath", "xray"))
    make_dist(tmp_path, "xray", requires=("botocore",))
    make_dist(tmp_path, "botocore", requires=("jmespath", "urllib3"))
    make_dist(tmp_path, "jmespath")
    make_dist(tmp_path, "urllib3")
    dists = pkg.read_distributions(tmp_path)
    needed = pkg.needed_distributions(dists, [Requirement("powertools")], ENV_312, excluded=["BotoCore"])
    assert needed == {"powertools", "xray", "jmespath"}


def test_remove_distribution_deletes_only_its_record(tmp_path: Path) -> None:
    # two distributions sharing the `google` namespace folder, as protobuf does
    make_dist(tmp_path, "protobuf", files={"google/protobuf/__init__.py": b"", "google/protobuf/x.py": b"x"})
    make_dist(tmp_path, "googleapis", files={"google/api/__init__.py": b""})
    (tmp_path / "google/protobuf/stray.txt").write_text("not in RECORD")
    dists = pkg.read_distributions(tmp_path)
    assert dists["protobuf"].size(tmp_path) > 0

    pkg.remove_distribution(tmp_path, dists["protobuf"])
    assert not (tmp_path / "google/protobuf/x.py").exists()
    assert not any(tmp_path.glob("protobuf-*.dist-info"))
    assert (tmp_path / "google/protobuf/stray.txt").exists()
    assert (tmp_path / "google/api/__init__.py").exists()
    assert "googleapis" in pkg.read_distributions(tmp_path)


def test_read_requirements_of_the_runtime_layers() -> None:
    base = {r.name: r for r in pkg.read_requirements(REPO / pkg.LAYER_REQUIREMENTS["runtime-base"])}
    ml = {r.name: r for r in pkg.read_requirements(REPO / pkg.LAYER_REQUIREMENTS["runtime-ml"])}
    assert set(base) == {"pydantic", "pydantic-settings", "aws-lambda-powertools"}
    assert base["aws-lambda-powertools"].extras == {"tracer", "parser"}
    assert set(ml) == {"onnxruntime", "tokenizers", "numpy", "pillow"}
    # runtime.txt (what dev.txt and so the venv install) is both, through -r
    both = [str(r) for r in pkg.read_requirements(REPO / "requirements" / "runtime.txt")]
    assert both == [str(r) for r in (*base.values(), *ml.values())]
    assert not {"boto3", "botocore"} & {*base, *ml}


def test_read_requirements_follows_includes(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("numpy>=1.26  # arrays\n--only-binary=:all:\n")
    (tmp_path / "top.txt").write_text("# comment\n-r base.txt\npillow>=10 ; sys_platform == 'linux'\n")
    assert [str(r) for r in pkg.read_requirements(tmp_path / "top.txt")] == [
        "numpy>=1.26",
        'pillow>=10; sys_platform == "linux"',
    ]
    (tmp_path / "bad.txt").write_text("not a requirement!\n")
    with pytest.raises(pkg.PackageError, match="cannot parse"):
        pkg.read_requirements(tmp_path / "bad.txt")


# --------------------------------------------------------------------------- trimming


def fake_layer(root: Path, *, ort_links_c_library: bool = False) -> None:
    files = {
        "numpy/__init__.py": b"",
        "numpy/__init__.pyi": b"stub",
        "numpy/__pycache__/__init__.cpython-311.pyc": b"pyc",
        "numpy/tests/test_x.py": b"",
        "numpy/_core/tests/test_y.py": b"",
        "numpy/_core/include/numpy/ndarrayobject.h": b"h",
        "numpy/_core/lib/libnpymath.a": b"a",
        "numpy/_core/_multiarray_umath.so": b"so",
        "numpy/testing/__init__.py": b"",
        "numpy/f2py/__init__.py": b"",
        "onnxruntime/__init__.py": b"",
        "onnxruntime/capi/onnxruntime_pybind11_state.cpython-312-x86_64-linux-gnu.so": (
            b"ELF NEEDED libonnxruntime.so.1" if ort_links_c_library else b"ELF static"
        ),
        "onnxruntime/capi/libonnxruntime.so.1.31.1": b"c api" * 100,
        "onnxruntime/capi/libonnxruntime_providers_shared.so": b"shared",
        "onnxruntime/tools/__init__.py": b"",
        "onnxruntime/transformers/__init__.py": b"",
        "onnxruntime/quantization/__init__.py": b"",
        "bin/f2py": b"#!",
        "wrapt-stubs/__init__.pyi": b"stub",
        "numpy-2.0.dist-info/RECORD": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_trim_tree_removes_only_what_no_import_needs(tmp_path: Path) -> None:
    fake_layer(tmp_path)
    size = pkg.tree_size(tmp_path)
    trimmed = pkg.trim_tree(tmp_path)
    left = {p.relative_to(tmp_path).as_posix() for p in pkg.iter_files(tmp_path)}
    assert left == {
        "numpy/__init__.py",
        "numpy/_core/_multiarray_umath.so",
        "numpy/testing/__init__.py",
        "onnxruntime/__init__.py",
        "onnxruntime/capi/onnxruntime_pybind11_state.cpython-312-x86_64-linux-gnu.so",
        "onnxruntime/capi/libonnxruntime_providers_shared.so",
        "numpy-2.0.dist-info/RECORD",
    }
    assert not (tmp_path / "wrapt-stubs").exists()  # emptied folders are pruned
    assert {"numpy/tests", "numpy/_core/tests", "onnxruntime/tools", "bin"} <= set(trimmed.dirs)
    assert "onnxruntime/capi/libonnxruntime.so.1.31.1" in trimmed.files
    assert trimmed.bytes == size - pkg.tree_size(tmp_path)


def test_onnxruntime_c_library_kept_when_the_extension_links_it(tmp_path: Path) -> None:
    fake_layer(tmp_path, ort_links_c_library=True)
    pkg.trim_tree(tmp_path)
    assert (tmp_path / "onnxruntime/capi/libonnxruntime.so.1.31.1").exists()


# --------------------------------------------------------------------------- zips and sizes


def test_zips_are_reproducible(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for rel in ("python/b/mod.py", "python/a/__init__.py", "python/a/lib.so"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(rel * 50)
    (tree / "python/a/lib.so").chmod(0o755)

    first = pkg.write_zip(tree, tmp_path / "one.zip")
    os.utime(tree / "python/b/mod.py", (1_700_000_000, 1_700_000_000))
    pkg.write_zip(tree, tmp_path / "two.zip")
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    assert first == (tmp_path / "one.zip").stat().st_size

    with zipfile.ZipFile(tmp_path / "one.zip") as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["python/a/__init__.py", "python/a/lib.so", "python/b/mod.py"]
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in infos}
        assert modes == {"python/a/__init__.py": 0o644, "python/a/lib.so": 0o755, "python/b/mod.py": 0o644}
        assert sum(i.file_size for i in infos) == pkg.tree_size(tree)


def fake_pip_install(
    requirements: Sequence[Path], dest: Path, *, python_version: str, arch: str, cache_dir: Path
) -> None:
    assert [p.name for p in requirements] == ["runtime-base.txt", "runtime-ml.txt"]  # one resolution
    # base: pydantic, pydantic-settings, powertools[tracer,parser]
    make_dist(dest, "pydantic", requires=("typing-extensions",), files={"pydantic/__init__.py": b"p" * 1000})
    make_dist(dest, "pydantic-settings", requires=("pydantic",), files={"pydantic_settings/__init__.py": b"s"})
    make_dist(
        dest,
        "aws-lambda-powertools",
        requires=('aws-xray-sdk; extra == "tracer"', 'pydantic; extra == "parser"', "typing-extensions"),
        files={"aws_lambda_powertools/__init__.py": b"a" * 500},
    )
    make_dist(dest, "aws-xray-sdk", requires=("botocore",), files={"aws_xray_sdk/__init__.py": b"x"})
    make_dist(dest, "typing-extensions", files={"typing_extensions.py": b"t" * 100})
    make_dist(dest, "botocore", requires=("urllib3",), files={"botocore/__init__.py": b"b" * 9000})
    make_dist(dest, "urllib3", files={"urllib3/__init__.py": b"u" * 100})
    # ml: onnxruntime, tokenizers, numpy, pillow (typing-extensions shared with base)
    make_dist(
        dest, "onnxruntime", requires=("numpy", "protobuf", "packaging"), files={"onnxruntime/__init__.py": b"o" * 4000}
    )
    make_dist(dest, "numpy", files={"numpy/__init__.py": b"n" * 3000, "numpy/tests/t.py": b"t" * 500})
    make_dist(dest, "protobuf", files={"google/protobuf/__init__.py": b"p" * 2000})
    make_dist(dest, "packaging", files={"packaging/__init__.py": b"k"})
    make_dist(
        dest, "tokenizers", requires=("huggingface-hub", "typing-extensions"), files={"tokenizers/__init__.py": b"z"}
    )
    make_dist(dest, "huggingface-hub", requires=("pyyaml",), files={"huggingface_hub/__init__.py": b"h" * 700})
    make_dist(dest, "pyyaml", files={"yaml/__init__.py": b"y"})
    make_dist(dest, "pillow", files={"PIL/__init__.py": b"i" * 2000})


def test_build_without_network_layouts_sizes_and_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pkg, "pip_install_target", fake_pip_install)
    out = tmp_path / "package"
    assert pkg.main(["--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    table = capsys.readouterr().out

    def top_level(layer: str) -> set[str]:
        return {p.name for p in (out / "layers" / layer / "python").iterdir() if not p.name.endswith(".dist-info")}

    # the runtime split: every distribution once, in the first layer whose requirements reach it
    assert top_level("runtime-base") == {
        "pydantic", "pydantic_settings", "aws_lambda_powertools", "aws_xray_sdk", "typing_extensions.py"
    }  # fmt: skip
    assert top_level("runtime-ml") == {"onnxruntime", "numpy", "packaging", "tokenizers", "PIL"}
    assert not (out / "layers/runtime-ml/python/numpy/tests").exists()
    assert top_level("inference") == {"sif_inference"}
    assert top_level("core") == {"sif_core"}
    assert top_level("metering") == {"sif_metering"}
    assert not (out / "pip-target").exists()
    for code, package_dir in {"api": "sif_api", "authorizer": "sif_authorizer", "worker": "sif_worker"}.items():
        assert (out / "functions" / code / package_dir / "__init__.py").exists()
    assert not list(out.rglob("__pycache__"))

    functions = pkg.template_functions(REPO / "template.yaml")
    codes = {fn.code for fn in functions.values()}
    zips = sorted(p.name for p in (out / "zips").iterdir())
    assert zips == sorted([f"layer-{n}.zip" for n in pkg.LAYERS] + [f"function-{c}.zip" for c in codes])
    with zipfile.ZipFile(out / "zips/layer-runtime-ml.zip") as zf:
        assert all(n.startswith("python/") for n in zf.namelist())
    with zipfile.ZipFile(out / "zips/function-api.zip") as zf:
        assert "sif_api/__init__.py" in zf.namelist()

    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["ok"] is True and sizes["python_version"] == "3.12" and sizes["arch"] == "x86_64"
    layers = sizes["layers"]
    assert set(layers) == set(pkg.LAYERS)
    assert set(sizes["functions"]) == set(functions)
    for name, fn in functions.items():  # each function counted with its own layers only
        got = sizes["functions"][name]
        assert got["logical_id"] == fn.logical_id and got["layers"] == list(fn.layers)
        assert got["unzipped"] == pkg.tree_size(out / "functions" / fn.code)
        assert got["total_unzipped"] == got["unzipped"] + sum(layers[n]["unzipped"] for n in fn.layers)
        assert got["total_zipped"] == got["zipped"] + sum(layers[n]["zipped"] for n in fn.layers)
        assert {k.removeprefix("layer_") for k in got if k.startswith("layer_")} == set(fn.layers)
    api, authorizer = sizes["functions"]["api"], sizes["functions"]["authorizer"]
    assert "runtime-ml" in api["layers"] and "runtime-ml" not in authorizer["layers"]
    assert authorizer["total_unzipped"] < api["total_unzipped"] - layers["runtime-ml"]["unzipped"] + 1
    assert layers["runtime-ml"]["zipped"] == (out / "zips/layer-runtime-ml.zip").stat().st_size
    dists = sizes["runtime_distributions"]
    assert dists["botocore"]["removed"] == "provided by the Lambda runtime"
    assert dists["urllib3"]["removed"] == "only needed by removed distributions"
    assert dists["pyyaml"]["removed"] == "only needed by removed distributions"
    assert dists["protobuf"]["removed"] == "onnxruntime offline tools only"
    assert dists["huggingface-hub"]["removed"].startswith("hub downloads only")
    assert {n: d["layer"] for n, d in dists.items() if not d["removed"]} == {
        "pydantic": "runtime-base",
        "pydantic-settings": "runtime-base",
        "aws-lambda-powertools": "runtime-base",
        "aws-xray-sdk": "runtime-base",
        "typing-extensions": "runtime-base",
        "onnxruntime": "runtime-ml",
        "numpy": "runtime-ml",
        "packaging": "runtime-ml",
        "tokenizers": "runtime-ml",
        "pillow": "runtime-ml",
    }
    assert dists["numpy"]["after"] < dists["numpy"]["before"]
    assert "numpy/tests" in sizes["trimmed"]["runtime-ml"]["dirs"]
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()[:1] and line.endswith("ok")}
    assert set(rows) == set(functions)
    header = next(line.split() for line in table.splitlines() if line.split()[:2] == ["function", "own"])
    for name, fn in functions.items():  # a "-" in the columns of the layers a function does not have
        cells = dict(zip(header[2 : 2 + len(pkg.LAYERS)], rows[name][2 : 2 + len(pkg.LAYERS)], strict=True))
        assert {c.lstrip("+") for c, v in cells.items() if v != "-"} == set(fn.layers), name

    assert pkg.main(["--out", str(out), "--limit-mib", "0.001"]) == 1
    assert "over the 0.001 MiB target" in capsys.readouterr().err
    assert json.loads((out / "sizes.json").read_text())["ok"] is False


def test_template_functions_and_their_layers(tmp_path: Path) -> None:
    functions = pkg.template_functions(REPO / "template.yaml")
    assert functions["api"].logical_id == "ApiFunction" and functions["api"].code == "api"
    events = functions["gpu-job-events"]
    assert events.logical_id == "GpuJobEventsFunction" and events.code == "worker"
    assert events.handler == "sif_worker.batch_events.lambda_handler"
    assert pkg.function_name("GpuJobEventsFunction") == "gpu-job-events"

    # the ML runtime layer holds none of the base layer's distributions: never without it
    text = (REPO / "template.yaml").read_text()
    broken = tmp_path / "template.yaml"
    broken.write_text(
        text.replace(
            "        - !Ref BaseRuntimeLayer\n        - !Ref MlRuntimeLayer\n", "        - !Ref MlRuntimeLayer\n", 1
        )
    )
    with pytest.raises(pkg.PackageError, match="runtime-ml layer but not \\['runtime-base'\\]"):
        pkg.template_functions(broken)
    broken.write_text(text.replace("ContentUri: build/package/layers/core", "ContentUri: build/package/layers/other"))
    with pytest.raises(pkg.PackageError, match="CoreLayer's ContentUri"):
        pkg.template_functions(broken)


def test_refuses_to_clear_the_repository() -> None:
    with pytest.raises(pkg.PackageError, match="refusing"):
        pkg.build(REPO, root=REPO)


# --------------------------------------------------------------------------- the real thing

HOST_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine())


@pytest.mark.skipif(sys.platform != "linux" or HOST_ARCH is None, reason="manylinux wheels need Linux")
def test_trimmed_runtime_layer_imports_and_runs_a_model(tmp_path: Path) -> None:
    """Same build as `make package`, but for this interpreter's version so it can be
    imported here: the trimmed layers, with the Lambda runtime's boto3 stand-in, import
    onnxruntime, tokenizers, numpy, PIL, pydantic, powertools and our packages, run an
    InferenceSession; each function's own layers import on their own; shipped bytecode
    (--compile-with) works too. Uses PyPI through pip's cache in .cache/pip-lambda."""
    assert HOST_ARCH is not None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = tmp_path / "package"
    report = pkg.build(out, python_version=version, arch=HOST_ARCH, compile_with=sys.executable)

    base, ml = out / "layers/runtime-base/python", out / "layers/runtime-ml/python"
    assert not (base / "botocore").exists() and not (ml / "huggingface_hub").exists()
    assert (base / "pydantic").is_dir() and not (ml / "pydantic").exists()
    tag = f"cpython-{version.replace('.', '')}"
    assert list((ml / "onnxruntime/capi").glob(f"onnxruntime_pybind11_state.{tag}-*.so"))
    assert list((ml / "numpy/__pycache__").glob(f"__init__.{tag}.pyc"))
    assert not report.over_limit(), pkg.format_report(report)

    summary = pkg.smoke_check(out, sys.executable, tmp_path, report.functions)
    assert summary["python"] == platform.python_version()
    packages = summary["packages"]
    assert isinstance(packages, list)
    assert {"sif_inference", "sif_core", "sif_metering", "sif_api"} <= set(packages)
    alone = summary["functions"]
    assert isinstance(alone, dict) and set(alone) == set(report.functions)
    for name, fn in report.functions.items():  # numpy only where the ML layer is
        assert alone[name]["numpy"] is ("runtime-ml" in fn.layers), name
