"""`sif tenant create` on the local stack: a name that is taken is refused, not a silent second tenant."""

from __future__ import annotations

import uuid

import pytest

from sif_cli import main as cli
from sif_core.tenants import list_tenants
from sif_emulator.stack import LocalStack

pytestmark = pytest.mark.integration


def test_a_taken_tenant_name_is_refused_unless_allowed(
    local_stack: LocalStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIF_STACK_JSON", str(local_stack.stack_json_path))
    name = f"dup-{uuid.uuid4().hex[:6]}"
    assert cli.main(["tenant", "create", name]) == 0
    capsys.readouterr()

    assert cli.main(["tenant", "create", name, "--monthly-calls", "5"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"a tenant named {name!r} already exists" in err and "--allow-duplicate" in err
    table = local_stack.table("TenantsTable")
    assert len([s for s in list_tenants(table) if s.tenant.name == name]) == 1

    assert cli.main(["tenant", "create", name, "--allow-duplicate"]) == 0
    assert capsys.readouterr().out.startswith("sif_")
    assert len([s for s in list_tenants(table) if s.tenant.name == name]) == 2
