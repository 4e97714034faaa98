"""template.yaml, read for the local stack: resources by type, intrinsics resolved, functions and routes.

The local stack creates what the template declares from the template itself. This module loads
the SAM template (CloudFormation short tags included, via cfn-lint's decoder), gives every
resource a deterministic local physical name, and resolves the intrinsics a template like ours
uses (Ref, Fn::Sub, Fn::GetAtt, Fn::Join, Fn::Select, Fn::Split, Fn::If with Conditions,
parameters with defaults and the pseudo parameters).

Ref / GetAtt values follow CloudFormation's conventions per resource type (a queue's Ref is
its URL, a bucket's is its name, a topic's is its ARN, ...). The stack may `bind` the real value
once a resource exists (a Batch job definition's ARN carries a revision, for instance).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STACK_NAME = "sif-local"
DEFAULT_ACCOUNT_ID = "123456789012"
DEFAULT_REGION = "us-east-1"

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TEMPLATE = REPO_ROOT / "template.yaml"

# Properties that name a resource explicitly, per type.
NAME_PROPERTIES: dict[str, str] = {
    "AWS::S3::Bucket": "BucketName",
    "AWS::SQS::Queue": "QueueName",
    "AWS::DynamoDB::Table": "TableName",
    "AWS::SNS::Topic": "TopicName",
    "AWS::Batch::ComputeEnvironment": "ComputeEnvironmentName",
    "AWS::Batch::JobQueue": "JobQueueName",
    "AWS::Batch::JobDefinition": "JobDefinitionName",
    "AWS::IAM::Role": "RoleName",
    "AWS::IAM::InstanceProfile": "InstanceProfileName",
    "AWS::Logs::LogGroup": "LogGroupName",
    "AWS::Serverless::Function": "FunctionName",
    "AWS::Serverless::LayerVersion": "LayerName",
    "AWS::Serverless::Api": "Name",
}

# Types whose Ref is their ARN (the others' Ref is their name, a queue's is its URL).
REF_IS_ARN = frozenset(
    {
        "AWS::SNS::Topic",
        "AWS::Batch::ComputeEnvironment",
        "AWS::Batch::JobQueue",
        "AWS::Batch::JobDefinition",
        "AWS::Serverless::LayerVersion",
    }
)

_SUB_VAR = re.compile(r"\$\{([^}!]+)\}")


class TemplateError(Exception):
    """The template uses something the local resolver cannot honour."""


class _NoValue:
    """AWS::NoValue: the property it stands for is removed."""

    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()


def load_template(path: str | Path = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """The template as plain dicts and lists, short tags expanded to their long forms (`Fn::Sub`, ...)."""
    from cfnlint.decode import cfn_yaml

    node = cfn_yaml.load(str(path))
    # cfn-lint's nodes carry line marks; a JSON round trip leaves plain containers.
    data: dict[str, Any] = json.loads(json.dumps(node))
    return data


@dataclass(frozen=True)
class FunctionSpec:
    """One AWS::Serverless::Function with SAM's Globals applied and intrinsics resolved."""

    logical_id: str
    name: str
    code_uri: str
    handler: str
    runtime: str
    timeout: int
    memory_size: int
    environment: dict[str, str]
    layers: tuple[str, ...]
    events: dict[str, dict[str, Any]]

    @property
    def module(self) -> str:
        """The handler's module, e.g. `sif_api.handler`."""
        return self.handler.rsplit(".", 1)[0]

    @property
    def attribute(self) -> str:
        """The handler's function name in its module, e.g. `lambda_handler`."""
        return self.handler.rsplit(".", 1)[1]

    @property
    def code_path(self) -> Path:
        return (REPO_ROOT / self.code_uri).resolve()


@dataclass(frozen=True)
class ApiRoute:
    """One `Type: Api` event: method + path of a REST API, the function behind it and its authorizer."""

    method: str
    path: str
    function: str
    event: str
    api: str
    authorizer: str | None
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = []
        for segment in self.path.strip("/").split("/"):
            m = re.fullmatch(r"\{(\w+)(\+?)\}", segment)
            if m and m.group(2):
                parts.append(f"(?P<{m.group(1)}>.+)")
            elif m:
                parts.append(f"(?P<{m.group(1)}>[^/]+)")
            else:
                parts.append(re.escape(segment))
        object.__setattr__(self, "_pattern", re.compile("^/" + "/".join(parts) + "$"))

    @property
    def resource(self) -> str:
        """API Gateway's `resource` field of a proxy event (the path template)."""
        return self.path

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The path parameters if this route serves `method path`, else None."""
        if method.upper() != self.method and self.method != "ANY":
            return None
        m = self._pattern.match(path)
        return None if m is None else m.groupdict()

    def matches_path(self, path: str) -> bool:
        return self._pattern.match(path) is not None


@dataclass(frozen=True)
class AuthorizerSpec:
    """A Lambda authorizer declared in an AWS::Serverless::Api's Auth.Authorizers."""

    name: str
    api: str
    function: str
    payload_type: str
    identity_headers: tuple[str, ...]
    ttl_s: int


@dataclass(frozen=True)
class QueueSubscription:
    """An `SQS` event source: the queue that feeds a function and how."""

    function: str
    event: str
    queue: str
    batch_size: int
    report_batch_item_failures: bool
    maximum_batching_window_s: int
    maximum_concurrency: int | None


class Template:
    """template.yaml with local physical names, pseudo parameters and parameter values."""

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        path: str | Path = DEFAULT_TEMPLATE,
        stack_name: str = DEFAULT_STACK_NAME,
        account_id: str = DEFAULT_ACCOUNT_ID,
        region: str = DEFAULT_REGION,
        parameters: Mapping[str, Any] | None = None,
        aws_endpoint_url: str = "http://127.0.0.1:5000",
    ) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = dict(data) if data is not None else load_template(self.path)
        self.stack_name = stack_name
        self.account_id = account_id
        self.region = region
        self.aws_endpoint_url = aws_endpoint_url.rstrip("/")
        self.resources: dict[str, dict[str, Any]] = self.data.get("Resources", {})
        self.globals: dict[str, Any] = self.data.get("Globals", {})
        self.parameter_values: dict[str, Any] = self._parameter_values(parameters or {})
        self._bound_refs: dict[str, Any] = {}
        self._bound_attrs: dict[tuple[str, str], Any] = {}
        self._names: dict[str, str] = {}
        self._condition_cache: dict[str, bool] = {}

    # ------------------------------------------------------------ parameters and names
    def _parameter_values(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, spec in self.data.get("Parameters", {}).items():
            if name in overrides:
                raw = overrides[name]
            elif "Default" in spec:
                raw = spec["Default"]
            else:
                continue  # asked for on use: TemplateError names it
            ptype = str(spec.get("Type", "String"))
            if (ptype.startswith("List<") or ptype == "CommaDelimitedList") and isinstance(raw, str):
                raw = [item.strip() for item in raw.split(",") if item.strip()]
            values[name] = raw
        for name, value in overrides.items():
            values.setdefault(name, value)
        return values

    def missing_parameters(self) -> list[str]:
        """Parameters without a default that were not given (the local stack supplies these)."""
        return [n for n in self.data.get("Parameters", {}) if n not in self.parameter_values]

    def parameter_type(self, name: str) -> str:
        return str(self.data.get("Parameters", {}).get(name, {}).get("Type", "String"))

    def set_parameter(self, name: str, value: Any) -> None:
        self.parameter_values[name] = value
        self._names.clear()
        self._condition_cache.clear()

    def pseudo(self, name: str) -> Any:
        pseudo: dict[str, Any] = {
            "AWS::StackName": self.stack_name,
            "AWS::AccountId": self.account_id,
            "AWS::Region": self.region,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackId": (
                f"arn:aws:cloudformation:{self.region}:{self.account_id}:stack/{self.stack_name}/"
                "00000000-0000-0000-0000-000000000000"
            ),
            "AWS::NotificationARNs": [],
            "AWS::NoValue": NO_VALUE,
        }
        if name not in pseudo:
            raise TemplateError(f"unknown pseudo parameter {name}")
        return pseudo[name]

    def resource_type(self, logical_id: str) -> str:
        try:
            return str(self.resources[logical_id]["Type"])
        except KeyError:
            raise TemplateError(f"no resource {logical_id!r} in {self.path.name}") from None

    def physical_name(self, logical_id: str) -> str:
        """The local name: the template's explicit name if it has one, else `<stack>-<logicalid lowercased>`."""
        if logical_id in self._names:
            return self._names[logical_id]
        rtype = self.resource_type(logical_id)
        props = self.resources[logical_id].get("Properties", {})
        explicit = props.get(NAME_PROPERTIES.get(rtype, ""))
        name = str(self.resolve(explicit)) if explicit is not None else f"{self.stack_name}-{logical_id.lower()}"
        self._names[logical_id] = name
        return name

    # ------------------------------------------------------------ resources
    def of_type(self, *types: str) -> dict[str, dict[str, Any]]:
        """Resources of the given type(s), logical id -> resource, in template order."""
        return {lid: r for lid, r in self.resources.items() if r.get("Type") in types}

    def logical_ids(self, rtype: str) -> list[str]:
        return list(self.of_type(rtype))

    def properties(self, logical_id: str) -> dict[str, Any]:
        """The resource's Properties with every intrinsic resolved (AWS::NoValue removed)."""
        resolved = self.resolve(self.resources[logical_id].get("Properties", {}))
        return resolved if isinstance(resolved, dict) else {}

    def raw_properties(self, logical_id: str) -> dict[str, Any]:
        props: dict[str, Any] = self.resources[logical_id].get("Properties", {})
        return props

    def dependencies(self, logical_id: str) -> set[str]:
        """Resources this one refers to (Ref, GetAtt, ${...} in Sub) or DependsOn."""
        resource = self.resources[logical_id]
        deps: set[str] = set()
        depends_on = resource.get("DependsOn", [])
        deps.update([depends_on] if isinstance(depends_on, str) else depends_on)
        deps.update(self._references(resource.get("Properties", {})))
        deps.discard(logical_id)
        return {d for d in deps if d in self.resources}

    def _references(self, value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key == "Ref" and isinstance(inner, str):
                    yield inner
                elif key == "Fn::GetAtt":
                    target = inner.split(".", 1)[0] if isinstance(inner, str) else inner[0]
                    yield str(target)
                elif key == "Fn::Sub":
                    text = inner if isinstance(inner, str) else inner[0]
                    local_vars = {} if isinstance(inner, str) else inner[1]
                    for var in _SUB_VAR.findall(text):
                        base = var.split(".", 1)[0]
                        if base not in local_vars:
                            yield base
                    yield from self._references(local_vars)
                else:
                    yield from self._references(inner)
        elif isinstance(value, list):
            for item in value:
                yield from self._references(item)

    def creation_order(self, logical_ids: Iterable[str] | None = None) -> list[str]:
        """Logical ids sorted so that every resource comes after those it depends on."""
        wanted = list(self.resources) if logical_ids is None else list(logical_ids)
        wanted_set = set(wanted)
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(lid: str, trail: tuple[str, ...]) -> None:
            if state.get(lid) == 2:
                return
            if state.get(lid) == 1:
                raise TemplateError("circular dependency: " + " -> ".join((*trail, lid)))
            state[lid] = 1
            for dep in sorted(self.dependencies(lid)):
                visit(dep, (*trail, lid))
            state[lid] = 2
            if lid in wanted_set:
                order.append(lid)

        for lid in wanted:
            visit(lid, ())
        return order

    # ------------------------------------------------------------ Ref / GetAtt
    def bind(self, logical_id: str, ref: Any = None, **attributes: Any) -> None:
        """Record the real Ref value / attributes of a created resource (overrides the computed ones)."""
        if ref is not None:
            self._bound_refs[logical_id] = ref
        for attr, value in attributes.items():
            self._bound_attrs[(logical_id, attr)] = value

    def ref(self, name: str) -> Any:
        if name.startswith("AWS::"):
            return self.pseudo(name)
        if name in self.data.get("Parameters", {}):
            if name not in self.parameter_values:
                raise TemplateError(f"parameter {name} has no default and no local value")
            return self.parameter_values[name]
        if name in self._bound_refs:
            return self._bound_refs[name]
        rtype = self.resource_type(name)
        pname = self.physical_name(name)
        if rtype == "AWS::SQS::Queue":
            return self.queue_url(pname)
        if rtype in REF_IS_ARN:
            return self._arn(name, rtype, pname)
        if rtype == "AWS::Serverless::Api":
            return "local"
        return pname

    def get_att(self, logical_id: str, attribute: str) -> Any:
        if (logical_id, attribute) in self._bound_attrs:
            return self._bound_attrs[(logical_id, attribute)]
        rtype = self.resource_type(logical_id)
        pname = self.physical_name(logical_id)
        if attribute == "Arn":
            return self._arn(logical_id, rtype, pname)
        by_type: dict[tuple[str, str], Any] = {
            ("AWS::SQS::Queue", "QueueName"): pname,
            ("AWS::SQS::Queue", "QueueUrl"): self.queue_url(pname),
            ("AWS::SNS::Topic", "TopicName"): pname,
            ("AWS::SNS::Topic", "TopicArn"): self._arn(logical_id, rtype, pname),
            ("AWS::S3::Bucket", "DomainName"): f"{pname}.s3.amazonaws.com",
            ("AWS::S3::Bucket", "RegionalDomainName"): f"{pname}.s3.{self.region}.amazonaws.com",
            ("AWS::IAM::Role", "RoleId"): "AROA" + pname.upper().replace("-", "")[:17],
            ("AWS::Serverless::Api", "RootResourceId"): "root",
        }
        if (rtype, attribute) not in by_type:
            raise TemplateError(f"GetAtt {logical_id}.{attribute} ({rtype}) is not resolved locally")
        return by_type[(rtype, attribute)]

    def queue_url(self, queue_name: str) -> str:
        return f"{self.aws_endpoint_url}/{self.account_id}/{queue_name}"

    def _arn(self, logical_id: str, rtype: str, pname: str) -> str:
        region, account = self.region, self.account_id
        if (logical_id, "Arn") in self._bound_attrs:
            return str(self._bound_attrs[(logical_id, "Arn")])
        formats = {
            "AWS::S3::Bucket": f"arn:aws:s3:::{pname}",
            "AWS::SQS::Queue": f"arn:aws:sqs:{region}:{account}:{pname}",
            "AWS::DynamoDB::Table": f"arn:aws:dynamodb:{region}:{account}:table/{pname}",
            "AWS::SNS::Topic": f"arn:aws:sns:{region}:{account}:{pname}",
            "AWS::IAM::Role": f"arn:aws:iam::{account}:role/{pname}",
            "AWS::IAM::InstanceProfile": f"arn:aws:iam::{account}:instance-profile/{pname}",
            "AWS::Batch::ComputeEnvironment": f"arn:aws:batch:{region}:{account}:compute-environment/{pname}",
            "AWS::Batch::JobQueue": f"arn:aws:batch:{region}:{account}:job-queue/{pname}",
            "AWS::Batch::JobDefinition": f"arn:aws:batch:{region}:{account}:job-definition/{pname}:1",
            "AWS::Logs::LogGroup": f"arn:aws:logs:{region}:{account}:log-group:{pname}:*",
            "AWS::Serverless::Function": f"arn:aws:lambda:{region}:{account}:function:{pname}",
            "AWS::Serverless::LayerVersion": f"arn:aws:lambda:{region}:{account}:layer:{pname}:1",
        }
        if rtype not in formats:
            raise TemplateError(f"GetAtt {logical_id}.Arn ({rtype}) is not resolved locally")
        if logical_id in self._bound_refs and rtype in REF_IS_ARN:
            return str(self._bound_refs[logical_id])
        return formats[rtype]

    # ------------------------------------------------------------ intrinsics
    def resolve(self, value: Any) -> Any:
        """`value` with every intrinsic function resolved; AWS::NoValue entries are dropped."""
        if isinstance(value, dict):
            if len(value) == 1:
                key, arg = next(iter(value.items()))
                if key == "Ref":
                    return self.ref(str(arg))
                if key.startswith("Fn::") or key == "Condition":
                    return self._intrinsic(key, arg)
            out = {}
            for key, inner in value.items():
                resolved = self.resolve(inner)
                if resolved is not NO_VALUE:
                    out[key] = resolved
            return out
        if isinstance(value, list):
            return [r for r in (self.resolve(v) for v in value) if r is not NO_VALUE]
        return value

    def _intrinsic(self, fn: str, arg: Any) -> Any:
        if fn == "Fn::GetAtt":
            logical_id, attribute = arg.split(".", 1) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))
            return self.get_att(str(logical_id), str(attribute))
        if fn == "Fn::Sub":
            return self._sub(arg)
        if fn == "Fn::Join":
            sep, items = arg
            return str(sep).join(str(i) for i in self.resolve(items))
        if fn == "Fn::Select":
            index, items = arg
            return self.resolve(items)[int(self.resolve(index))]
        if fn == "Fn::Split":
            sep, text = arg
            return str(self.resolve(text)).split(str(sep))
        if fn == "Fn::If":
            cond, if_true, if_false = arg
            return self.resolve(if_true if self.condition(str(cond)) else if_false)
        if fn == "Fn::Equals":
            a, b = (self.resolve(v) for v in arg)
            return str(a) == str(b)
        if fn == "Fn::Not":
            return not self._truth(arg[0])
        if fn == "Fn::And":
            return all(self._truth(v) for v in arg)
        if fn == "Fn::Or":
            return any(self._truth(v) for v in arg)
        if fn == "Condition":
            return self.condition(str(arg))
        if fn == "Fn::GetAZs":
            return [f"{self.region}{z}" for z in "abc"]
        if fn == "Fn::Base64":
            import base64

            return base64.b64encode(str(self.resolve(arg)).encode()).decode()
        if fn == "Fn::ToJsonString":
            return json.dumps(self.resolve(arg), separators=(",", ":"))
        raise TemplateError(f"{fn} is not resolved locally")

    def _truth(self, value: Any) -> bool:
        return bool(self.resolve(value))

    def condition(self, name: str) -> bool:
        if name not in self._condition_cache:
            conditions = self.data.get("Conditions", {})
            if name not in conditions:
                raise TemplateError(f"unknown condition {name}")
            self._condition_cache[name] = self._truth(conditions[name])
        return self._condition_cache[name]

    def resource_enabled(self, logical_id: str) -> bool:
        """False if the resource has a Condition that is false here."""
        cond = self.resources[logical_id].get("Condition")
        return True if cond is None else self.condition(str(cond))

    def _sub(self, arg: Any) -> str:
        text, local_vars = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))

        def replace(m: re.Match[str]) -> str:
            var = m.group(1).strip()
            if var in local_vars:
                return str(local_vars[var])
            if "." in var and not var.startswith("AWS::"):
                logical_id, attribute = var.split(".", 1)
                return str(self.get_att(logical_id, attribute))
            value = self.ref(var)
            if isinstance(value, list):
                raise TemplateError(f"${{{var}}} is a list and cannot be substituted into a string")
            return str(value)

        # `${!Literal}` stays `${Literal}`.
        return _SUB_VAR.sub(replace, str(text)).replace("${!", "${")

    # ------------------------------------------------------------ SAM: functions, routes, queues
    def _function_globals(self) -> dict[str, Any]:
        result: dict[str, Any] = self.globals.get("Function", {})
        return result

    def function_properties(self, logical_id: str) -> dict[str, Any]:
        """A function's raw Properties with SAM Globals merged in (maps merge, the function wins)."""
        merged = copy.deepcopy(self._function_globals())
        for key, value in self.raw_properties(logical_id).items():
            if key == "Environment" and "Environment" in merged:
                variables = {**merged["Environment"].get("Variables", {}), **value.get("Variables", {})}
                merged["Environment"] = {**merged["Environment"], **value, "Variables": variables}
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = copy.deepcopy(value)
        return merged

    def functions(self) -> dict[str, FunctionSpec]:
        """Every AWS::Serverless::Function, logical id -> spec (Globals applied, env resolved)."""
        specs: dict[str, FunctionSpec] = {}
        for lid in self.of_type("AWS::Serverless::Function"):
            props = self.function_properties(lid)
            env = self.resolve(props.get("Environment", {}).get("Variables", {}))
            layers = []
            for layer in props.get("Layers", []):
                layers.append(layer["Ref"] if isinstance(layer, dict) and "Ref" in layer else str(layer))
            events = {}
            for name, event in props.get("Events", {}).items():
                events[name] = {"Type": event.get("Type"), **self.resolve(event.get("Properties", {}))}
            specs[lid] = FunctionSpec(
                logical_id=lid,
                name=self.physical_name(lid),
                code_uri=str(props.get("CodeUri", "")),
                handler=str(props["Handler"]),
                runtime=str(props.get("Runtime", "")),
                timeout=int(self.resolve(props.get("Timeout", 3))),
                memory_size=int(self.resolve(props.get("MemorySize", 128))),
                environment={k: str(v) for k, v in env.items()},
                layers=tuple(layers),
                events=events,
            )
        return specs

    def function_timeout(self, logical_id: str) -> int:
        return int(self.resolve(self.function_properties(logical_id).get("Timeout", 3)))

    def authorizers(self) -> dict[str, AuthorizerSpec]:
        """Lambda authorizers of every AWS::Serverless::Api, by authorizer name."""
        found: dict[str, AuthorizerSpec] = {}
        for api_id, api in self.of_type("AWS::Serverless::Api").items():
            auth = api.get("Properties", {}).get("Auth", {})
            for name, spec in auth.get("Authorizers", {}).items():
                function_arn = spec.get("FunctionArn", {})
                function = self._target_logical_id(function_arn)
                identity = spec.get("Identity", {})
                found[name] = AuthorizerSpec(
                    name=name,
                    api=api_id,
                    function=function,
                    payload_type=str(spec.get("FunctionPayloadType", "TOKEN")),
                    identity_headers=tuple(identity.get("Headers", [])),
                    ttl_s=int(self.resolve(identity.get("ReauthorizeEvery", 300))),
                )
        return found

    @staticmethod
    def _target_logical_id(value: Any) -> str:
        if isinstance(value, dict) and "Fn::GetAtt" in value:
            target = value["Fn::GetAtt"]
            return str(target.split(".", 1)[0] if isinstance(target, str) else target[0])
        if isinstance(value, dict) and "Ref" in value:
            return str(value["Ref"])
        raise TemplateError(f"cannot tell which resource {value!r} names")

    def api_routes(self) -> list[ApiRoute]:
        """Every `Type: Api` event as a route; literal paths sort before parameterised ones."""
        routes: list[ApiRoute] = []
        apis = self.of_type("AWS::Serverless::Api")
        for lid in self.of_type("AWS::Serverless::Function"):
            for event_name, event in self.raw_properties(lid).get("Events", {}).items():
                if event.get("Type") != "Api":
                    continue
                props = event.get("Properties", {})
                api_ref = props.get("RestApiId")
                api = self._target_logical_id(api_ref) if api_ref is not None else "ServerlessRestApi"
                default = apis.get(api, {}).get("Properties", {}).get("Auth", {}).get("DefaultAuthorizer")
                authorizer = props.get("Auth", {}).get("Authorizer", default)
                routes.append(
                    ApiRoute(
                        method=str(props["Method"]).upper(),
                        path=str(props["Path"]),
                        function=lid,
                        event=event_name,
                        api=api,
                        authorizer=None if authorizer in (None, "NONE") else str(authorizer),
                    )
                )
        routes.sort(key=lambda r: (r.path.count("{"), -r.path.count("/"), r.path, r.method))
        return routes

    def queue_subscriptions(self) -> list[QueueSubscription]:
        """Every `Type: SQS` event: which queue (logical id) feeds which function."""
        subs: list[QueueSubscription] = []
        for lid in self.of_type("AWS::Serverless::Function"):
            for event_name, event in self.raw_properties(lid).get("Events", {}).items():
                if event.get("Type") != "SQS":
                    continue
                props = event.get("Properties", {})
                scaling = self.resolve(props.get("ScalingConfig", {}))
                subs.append(
                    QueueSubscription(
                        function=lid,
                        event=event_name,
                        queue=self._target_logical_id(props["Queue"]),
                        batch_size=int(self.resolve(props.get("BatchSize", 10))),
                        report_batch_item_failures="ReportBatchItemFailures"
                        in self.resolve(props.get("FunctionResponseTypes", [])),
                        maximum_batching_window_s=int(self.resolve(props.get("MaximumBatchingWindowInSeconds", 0))),
                        maximum_concurrency=(
                            int(scaling["MaximumConcurrency"]) if "MaximumConcurrency" in scaling else None
                        ),
                    )
                )
        return subs

    def outputs(self) -> dict[str, Any]:
        """The template's Outputs, resolved where they can be (unresolvable ones are left out)."""
        out: dict[str, Any] = {}
        for name, spec in self.data.get("Outputs", {}).items():
            try:
                out[name] = self.resolve(spec.get("Value"))
            except TemplateError:
                continue
        return out
