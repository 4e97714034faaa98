"""S3's checks of presigned (query-string SigV4) URLs, as WSGI middleware in front of moto's server.

moto's server takes any request: a presigned URL with its key edited, its method changed or past its
expiry works locally, where S3 refuses it. `PresignedUrlCheck` does what S3 does with a request
that carries `X-Amz-Signature` in its query: it recomputes the signature with botocore's own signer
and the credentials the stack signs with (the key, method, query and every signed header count),
then checks the expiry (`X-Amz-Date` + `X-Amz-Expires`), and answers S3's XML error otherwise:

- 403 `SignatureDoesNotMatch`: anything signed differs (key, bucket, method, a signed header, a
  query parameter, X-Amz-Expires), or the secret differs;
- 403 `AccessDenied` "Request has expired";
- 403 `InvalidAccessKeyId`: signed with an access key the stack does not sign with;
- 400 `AuthorizationQueryParametersError`: a malformed or missing X-Amz-* parameter;
- 400 `InvalidArgument`: both a query signature and an Authorization header;
- 400 `InvalidRequest`: a SigV2 query signature (S3 takes none for buckets created since 2020);
- 403 `AccessDenied`: an S3 request with no signature at all (the stack's buckets are private).

Calls signed in the Authorization header keep taking any dummy credentials, as moto does: local
clients use `AWS_ENDPOINT_URL` with whatever credentials they have. moto's own API (`/moto-api`)
and CORS preflights (OPTIONS) need no signature, as on AWS.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit
from xml.sax.saxutils import escape

from sif_emulator.moto_patches import is_s3_request, presigned_signature

log = logging.getLogger("sif_emulator.moto_server")

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_EXPIRES_S = 7 * 24 * 3600  # SigV4 presigned URLs live a week at most
SIGV4_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Date", "X-Amz-SignedHeaders")
AUTH_PARAMS = {*SIGV4_PARAMS, "X-Amz-Expires", "X-Amz-Security-Token"}
UNSIGNED_PATHS = ("/moto-api", "/favicon.ico", "/latest/meta-data/", "/latest/api/")

StartResponse = Callable[..., Any]


@dataclass(frozen=True)
class SigningCredentials:
    """An identity the stack signs presigned URLs with."""

    access_key: str
    secret_key: str
    token: str | None = None


@dataclass
class S3Error(Exception):
    """An error S3 answers with (status, Code, Message and the extra elements S3 adds)."""

    status: int
    code: str
    message: str
    extra: tuple[tuple[str, str], ...] = ()

    def body(self, request_id: str, host_id: str) -> bytes:
        elements = [("Code", self.code), ("Message", self.message), *self.extra]
        elements += [("RequestId", request_id), ("HostId", host_id)]
        inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in elements)
        return f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>{inner}</Error>'.encode()

    def respond(self, environ: Mapping[str, Any], start_response: StartResponse) -> list[bytes]:
        request_id = os.urandom(8).hex().upper()
        host_id = base64.b64encode(os.urandom(48)).decode()
        body = b"" if environ.get("REQUEST_METHOD") == "HEAD" else self.body(request_id, host_id)
        reason = {400: "Bad Request", 403: "Forbidden"}.get(self.status, "Error")
        start_response(
            f"{self.status} {reason}",
            [
                ("Content-Type", "application/xml"),
                ("Content-Length", str(len(body))),
                ("x-amz-request-id", request_id),
                ("x-amz-id-2", host_id),
                ("Server", "AmazonS3"),
            ],
        )
        return [body]


def _query_error(message: str) -> S3Error:
    return S3Error(400, "AuthorizationQueryParametersError", message)


class PresignedUrlCheck:
    """WSGI middleware: S3's verification of query-string SigV4 requests (see the module docstring).

    `credentials`: the identities presigned URLs may be signed with (access key -> credentials);
    `clock`: epoch seconds now (tests move it).
    """

    def __init__(
        self,
        app: Any,
        credentials: Iterable[SigningCredentials],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.credentials = {c.access_key: c for c in credentials}
        self.clock = clock

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Any:
        path = str(environ.get("PATH_INFO", ""))
        if path.startswith(UNSIGNED_PATHS):
            return self.app(environ, start_response)
        query = parse_qsl(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        names = {name for name, _ in query}
        has_header = bool(environ.get("HTTP_AUTHORIZATION"))
        try:
            if names & {*SIGV4_PARAMS, "X-Amz-Expires"}:
                if has_header:
                    raise S3Error(
                        400,
                        "InvalidArgument",
                        "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature "
                        "query string parameter or the Authorization header should be specified",
                        (("ArgumentName", "Authorization"), ("ArgumentValue", str(environ["HTTP_AUTHORIZATION"]))),
                    )
                self.verify(environ, query)
            elif {"Signature", "AWSAccessKeyId"} <= names:
                raise S3Error(
                    400,
                    "InvalidRequest",
                    "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.",
                )
            elif not has_header and environ.get("REQUEST_METHOD") != "OPTIONS" and is_s3_request(self.app, environ):
                raise S3Error(403, "AccessDenied", "Access Denied")
        except S3Error as error:
            log.info("refused %s %s: %s", environ.get("REQUEST_METHOD"), path, error.code)
            return error.respond(environ, start_response)
        return self.app(environ, start_response)

    # ------------------------------------------------------------ SigV4 query auth
    def verify(self, environ: Mapping[str, Any], query: list[tuple[str, str]]) -> None:
        """Raise the S3Error S3 would answer this query-signed request with; None when it is valid."""
        params = dict(query)
        missing = [name for name in (*SIGV4_PARAMS, "X-Amz-Expires") if not params.get(name)]
        if missing:
            raise _query_error(
                "Query-string authentication version 4 requires the X-Amz-Algorithm, X-Amz-Credential, "
                "X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and X-Amz-Expires parameters."
            )
        if params["X-Amz-Algorithm"] != ALGORITHM:
            raise _query_error(f'X-Amz-Algorithm only supports "{ALGORITHM}"')
        scope = params["X-Amz-Credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request" or not all(scope):
            raise _query_error(
                "Error parsing the X-Amz-Credential parameter; the Credential is mal-formed; "
                'expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".'
            )
        access_key, day, region, service, _ = scope
        timestamp = params["X-Amz-Date"]
        try:
            signed_at = datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise _query_error("X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"") from None
        if day != timestamp[:8]:
            raise _query_error(
                f'Error parsing the X-Amz-Credential parameter; Invalid credential date "{day}". '
                f'This date is not the same as X-Amz-Date: "{timestamp[:8]}".'
            )
        try:
            expires = int(params["X-Amz-Expires"])
        except ValueError:
            raise _query_error("X-Amz-Expires should be a number") from None
        if expires < 0:
            raise _query_error("X-Amz-Expires must be non-negative")
        if expires > MAX_EXPIRES_S:
            raise _query_error(f"X-Amz-Expires must be less than a week (in seconds) that is {MAX_EXPIRES_S}")
        known = self.credentials.get(access_key)
        if known is None:
            raise S3Error(
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
                (("AWSAccessKeyId", access_key),),
            )
        token = params.get("X-Amz-Security-Token")
        if token is not None and token != known.token:
            raise S3Error(400, "InvalidToken", "The provided token is malformed or otherwise invalid.")

        signed_names = [h.strip().lower() for h in params["X-Amz-SignedHeaders"].split(";") if h.strip()]
        headers = {name: value for name in signed_names if (value := _header(environ, name)) is not None}
        # The signer puts the auth parameters back itself (from the values checked above).
        unsigned_query = urlencode([(k, v) for k, v in query if k not in AUTH_PARAMS], quote_via=quote)
        url = f"http://{environ.get('HTTP_HOST', '')}{_canonical_path(environ)}?{unsigned_query}"
        expected = presigned_signature(
            access_key=access_key,
            secret_key=known.secret_key,
            token=token,
            service=service,
            region=region,
            method=str(environ.get("REQUEST_METHOD", "GET")),
            url=url,
            headers=headers,
            timestamp=timestamp,
            expires=expires,
        )
        provided = params["X-Amz-Signature"]
        if not hmac.compare_digest(expected.signature, provided.lower()):
            raise S3Error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. "
                "Check your key and signing method.",
                (
                    ("AWSAccessKeyId", access_key),
                    ("StringToSign", expected.string_to_sign),
                    ("SignatureProvided", provided),
                    ("CanonicalRequest", expected.canonical_request),
                ),
            )
        now = datetime.fromtimestamp(self.clock(), UTC)
        if now.timestamp() > signed_at.timestamp() + expires:
            ends = datetime.fromtimestamp(signed_at.timestamp() + expires, UTC)
            raise S3Error(
                403,
                "AccessDenied",
                "Request has expired",
                (
                    ("X-Amz-Expires", str(expires)),
                    ("Expires", ends.strftime("%Y-%m-%dT%H:%M:%SZ")),
                    ("ServerTime", now.strftime("%Y-%m-%dT%H:%M:%SZ")),
                ),
            )


def _header(environ: Mapping[str, Any], name: str) -> str | None:
    if name == "host":
        key = "HTTP_HOST"
    elif name in ("content-type", "content-length"):
        key = name.upper().replace("-", "_")
    else:
        key = "HTTP_" + name.upper().replace("-", "_")
    value = environ.get(key)
    return None if value is None else str(value)


def _canonical_path(environ: Mapping[str, Any]) -> str:
    """The request's path as SigV4 for S3 signs it: each character URI-encoded once, `/` and `~` kept
    (what botocore does to a key), whatever encoding the client sent it with."""
    raw = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "")
    if "://" in raw.split("?", 1)[0]:  # an absolute-form request line
        raw = urlsplit(raw).path
    if raw.startswith("/"):
        path = unquote(raw.split("?", 1)[0])
    else:  # only the decoded WSGI path: its characters are latin-1 stand-ins for UTF-8 bytes
        path = str(environ.get("PATH_INFO", "")).encode("latin-1").decode("utf-8", errors="replace")
    return quote(path, safe="/~") or "/"
