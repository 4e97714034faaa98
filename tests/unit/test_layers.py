"""Each function's cold start imports only what its own layers (or the Lambda runtime) provide.

For every function of template.yaml, a fresh interpreter (``-I -S``, so neither this
environment's site-packages nor the editable install) imports the module named by its Handler,
with the function's environment from the template and, on sys.path in Lambda's order: its
CodeUri; its layers laid out as `make package` builds them (layers/<name>/python/), the
first-party ones as links to the sources, the third-party ones as links to exactly the
distributions `make package` puts in them (same split: sif_tools.package.assign_layers, this
environment's versions); a stand-in for /var/runtime (boto3 and its dependencies); the stdlib.
So an optional import (``try: import requests``) finds what Lambda would find.

To report every miss, not just the first, a package the function's layers lack is still found,
last: a first-party one from the layer that has it, a third-party one (after a
ModuleNotFoundError for it) from this environment, and the import runs again. Each such package
is reported with the chain that imported it, e.g.
``numpy <- sif_inference.embedder <- sif_inference <- sif_metering.pricing <- sif_metering <- ...``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from sif_tools import package as pkg
from sif_tools.template import Template

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "template.yaml"
FUNCTIONS = pkg.template_functions(TEMPLATE)
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HOST_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine(), "x86_64")
ML_ONLY = ("numpy", "onnxruntime")
MAX_RUNS = 12

# Runs in the fresh interpreter; argv[1] is a JSON spec (module, paths, elsewhere).
IMPORT_SCRIPT = r"""
import importlib, importlib.machinery, json, sys, traceback
spec = json.loads(sys.argv[1])
sys.path[:0] = spec["paths"]
importers = {}
SKIP = ("importlib._bootstrap", "importlib._bootstrap_external", "_frozen_importlib", "importlib")

class Record:
    # Notes who imports each module first (found or not); finds nothing itself.
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in importers:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__") in SKIP:
                frame = frame.f_back
            importers[name] = frame.f_globals.get("__name__") if frame is not None else None
        return None

class Elsewhere:
    # Top-level packages the function's own paths lack, from the other layers, after everything.
    @staticmethod
    def find_spec(name, path=None, target=None):
        return importlib.machinery.PathFinder.find_spec(name, spec["elsewhere"]) if path is None else None

sys.meta_path.insert(0, Record)
sys.meta_path.append(Elsewhere)
error = missing = None
try:
    importlib.import_module(spec["module"])
except ModuleNotFoundError as exc:
    error, missing = traceback.format_exc(), (exc.name or "").partition(".")[0] or None
except BaseException:
    error = traceback.format_exc()
origins = {}
for name, module in list(sys.modules.items()):
    if "." not in name:
        where = getattr(module, "__file__", None)
        if where is None and getattr(module, "__path__", None):
            where = list(module.__path__)[0]
        origins[name] = where
print(json.dumps({"origins": origins, "importers": importers, "error": error, "missing": missing}))
"""


@dataclass
class ColdStart:
    """What a function's handler module imported at cold start, and from where."""

    function: pkg.LambdaFunction
    origins: dict[str, str | None]  # top-level module -> its file or folder (None: built in)
    importers: dict[str, str | None]  # module -> the module that imported it first
    error: str | None  # the import's traceback, when even the fallbacks did not get it through
    own: dict[str, Path]  # where the function's code, layers and the runtime are
    elsewhere: dict[str, Path]  # where what it lacks came from: other first-party layers, "site-packages"

    def chain(self, name: str) -> str:
        """``name <- importer <- ... <- handler module``."""
        links, current = [name], self.importers.get(name)
        while current is not None and current != "__main__" and current not in links:
            links.append(current)
            current = self.importers.get(current)
        return " <- ".join(links)

    def problems(self) -> list[str]:
        """Each imported top-level package that its code, its layers, the Lambda runtime and
        the stdlib do not provide: where it is instead, and the chain that imported it."""
        owners = third_party_owners()
        found: list[str] = []
        for top, origin in sorted(self.origins.items()):
            if origin is None or top == "__main__" or _under(origin, STDLIB, *self.own.values()):
                continue
            where = next((name for name, d in self.elsewhere.items() if _under(origin, d)), None)
            if where == "site-packages":
                dists = distributions_of(top)
                layers = sorted({owners[d] for d in dists if d in owners})
                where = f"distribution {'/'.join(dists) or '?'}, " + (
                    f"in the {'/'.join(layers)} layer" if layers else "in no layer"
                )
            elif where is not None:
                where = f"in the {where} layer"
            else:
                where = f"from {origin}, which no layer holds"
            found.append(f"{top}: {where} ({self.chain(top)})")
        return found


def _under(path: str, *folders: Path) -> bool:
    return any(Path(path).is_relative_to(folder) for folder in folders)


def _link_distributions(dists: Iterable[pkg.Distribution], dest: Path) -> None:
    """Links in ``dest`` to these distributions' top-level files and folders (as a layer's
    python/ holds them), dist-info included."""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in dists:
        for top in {rel.parts[0] for rel in dist.files} - {"..", "__pycache__", "bin"}:
            link = dest / top
            if not link.is_symlink() and (SITE_PACKAGES / top).exists():
                link.symlink_to(SITE_PACKAGES / top)


@cache
def installed() -> dict[str, pkg.Distribution]:
    return pkg.read_distributions(SITE_PACKAGES)


@cache
def third_party_owners() -> dict[str, str]:
    """Distribution -> the third-party layer `make package` puts it in."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    requirements = {layer: pkg.read_requirements(REPO / rel) for layer, rel in pkg.LAYER_REQUIREMENTS.items()}
    return pkg.assign_layers(installed(), requirements, pkg.target_environment(version, HOST_ARCH))


@cache
def distributions_of(top: str) -> tuple[str, ...]:
    return tuple(sorted({canonicalize_name(d) for d in importlib.metadata.packages_distributions().get(top, ())}))


def _environment(fn: pkg.LambdaFunction, home: Path, endpoint: str) -> dict[str, str]:
    """The function's environment from the template, what Lambda itself sets, and AWS calls
    sent to ``endpoint`` (never to AWS)."""
    spec = Template(path=TEMPLATE).functions()[fn.logical_id]
    return {
        **spec.environment,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_LAMBDA_FUNCTION_NAME": spec.name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_size),
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
        "LAMBDA_TASK_ROOT": str(spec.code_path),
        "SIF_MODEL_CACHE_DIR": str(home / "models"),
    }


def cold_start(name: str, root: Path, endpoint: str) -> ColdStart:
    """Import ``name``'s handler module as its Lambda would, at ``root`` (a fresh folder), AWS
    calls going to ``endpoint``."""
    fn = FUNCTIONS[name]
    own: dict[str, Path] = {"code": (REPO / fn.code_uri).resolve()}
    elsewhere: dict[str, Path] = {}
    owners = third_party_owners()
    for layer in pkg.LAYERS:
        python = root / "layers" / layer / "python"
        python.mkdir(parents=True)
        for src in pkg.LAYER_SOURCES.get(layer, ()):
            (python / Path(src).name).symlink_to(REPO / src, target_is_directory=True)
        _link_distributions((d for n, d in installed().items() if owners.get(n) == layer), python)
        (own if layer in fn.layers else elsewhere)[layer] = python
    own["lambda-runtime"] = pkg.lambda_runtime_stub(root / "var-runtime")
    elsewhere = {n: d for n, d in elsewhere.items() if n in pkg.LAYER_SOURCES}  # third-party: only on demand
    elsewhere["site-packages"] = root / "site-packages"
    elsewhere["site-packages"].mkdir()
    spec = {
        "module": fn.handler.rpartition(".")[0],
        "paths": [str(p) for p in own.values()],
        "elsewhere": [str(p) for p in elsewhere.values()],
    }
    env = _environment(fn, root, endpoint)
    for _ in range(MAX_RUNS):
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-B", "-c", IMPORT_SCRIPT, json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            cwd=root,
            timeout=300,
        )
        assert result.returncode == 0 and result.stdout.strip(), result.stderr[-4000:]
        report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        missing = report["missing"]
        dists = [installed()[d] for d in distributions_of(missing) if d in installed()] if missing else []
        if not dists or (elsewhere["site-packages"] / missing).exists():
            break
        _link_distributions(dists, elsewhere["site-packages"])  # then import again, to find the next miss
    return ColdStart(fn, report["origins"], report["importers"], report["error"], own, elsewhere)


def _param(name: str) -> Any:
    return name


class EmptyBucket(BaseHTTPRequestHandler):
    """Every AWS call a cold start makes (the API function lists the models bucket to load its
    models) answered as an empty S3 listing: no model loads, nothing leaves this machine."""

    BODY = (
        b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Name>models</Name><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"
        b"</ListBucketResult>"
    )

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    do_POST = do_PUT = do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def aws_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EmptyBucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def cold_starts(tmp_path_factory: pytest.TempPathFactory, aws_endpoint: str) -> Callable[[str], ColdStart]:
    """Each function's cold start, run once per module."""
    found: dict[str, ColdStart] = {}

    def get(name: str) -> ColdStart:
        if name not in found:
            found[name] = cold_start(name, tmp_path_factory.mktemp(name), aws_endpoint)
        return found[name]

    return get


@pytest.mark.parametrize("name", [_param(n) for n in FUNCTIONS])
def test_cold_start_imports_only_what_its_layers_provide(name: str, cold_starts: Callable[[str], ColdStart]) -> None:
    start = cold_starts(name)
    fn = start.function
    assert start.error is None, f"{fn.logical_id}: importing {fn.handler} failed:\n{start.error}"
    problems = start.problems()
    assert not problems, (
        f"{fn.logical_id} (layers {', '.join(fn.layers)}) imports at cold start what its layers do not provide:\n  "
        + "\n  ".join(problems)
    )


def test_authorizer_imports_neither_numpy_nor_onnxruntime(cold_starts: Callable[[str], ColdStart]) -> None:
    start = cold_starts("authorizer")
    assert start.error is None, start.error
    pulled = {top: start.chain(top) for top in ML_ONLY if top in start.origins}
    assert not pulled, f"the authorizer imports {', '.join(pulled.values())}"
    assert "sif_inference" not in start.origins, start.chain("sif_inference")
    assert not {"runtime-ml", "inference"} & set(start.function.layers)


def test_template_layers_match_the_package_build() -> None:
    """Every layer make package builds is a layer resource of the template, the functions that
    run models have them all, and the split runtime layers are used together."""
    template = Template(path=TEMPLATE)
    uris = {
        str(r["Properties"]["ContentUri"]).rstrip("/")
        for r in template.of_type("AWS::Serverless::LayerVersion").values()
    }
    assert uris == {f"{pkg.LAYER_CONTENT_DIR}/{layer}" for layer in pkg.LAYERS}
    for name in ("api", "scorer", "worker"):
        assert FUNCTIONS[name].layers == pkg.LAYERS, name
    for fn in FUNCTIONS.values():
        assert "runtime-base" in fn.layers and "core" in fn.layers, fn.logical_id
        assert len(fn.layers) <= 5, f"{fn.logical_id}: Lambda allows 5 layers per function"
    owners = third_party_owners()
    assert owners["numpy"] == owners["onnxruntime"] == owners["tokenizers"] == owners["pillow"] == "runtime-ml"
    assert owners["pydantic"] == owners["pydantic-settings"] == owners["aws-lambda-powertools"] == "runtime-base"
    assert owners["typing-extensions"] == "runtime-base"  # shared: in the earlier layer only
    assert "botocore" not in owners and "huggingface-hub" not in owners
