"""Where the store's requests go: the configuration, resolved once from the AWS chain.

resolve_transport -> Transport, from the chain botocore itself reads: endpoint and where it
came from, region, addressing style, credentials (refreshable ones too), CA bundle, proxy.
The plain-http rule (check_endpoint) is checked on that object first: keys never cross the
network in clear, so http:// is allowed to loopback only, never through a proxy.
boto3/botocore only resolve configuration and credentials here; the requests themselves go
through client.Client (awscrt), which is handed the Transport whole.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, field

import botocore.configprovider
import botocore.exceptions
import botocore.httpsession
import botocore.session
import botocore.utils
from botocore.config import Config

from ..errors import SecurityRefusal, StoreSetupError, UserError

AWS_DEFAULT = "the AWS default endpoint"


# ---------------------------------------------------------------------------- the endpoint rule
def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str | None,
                   source: str = "--endpoint-url") -> urllib.parse.SplitResult | None:
    """The plain-http rule: keys never cross the network in clear, so http:// is allowed to
    loopback only. `source` names where the URL came from, for the one-line refusal."""
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    try:
        host = parts.hostname
        parts.port                               # noqa: B018 - raises on a bad port
    except ValueError:
        host = None
    if parts.scheme not in ("http", "https") or not host:
        raise UserError(f"bad endpoint URL {url!r} (from {source}): expected "
                        "http(s)://host[:port]")
    if parts.scheme == "http" and not is_loopback(host):
        raise SecurityRefusal(
            f"refusing plain http:// to {host} (from {source}): SSE-C keys would cross the "
            "network unencrypted; use https://")
    return parts


@dataclass(frozen=True)
class Transport:
    """Where every request of the store goes and how, resolved once (resolve_transport) from
    the chain botocore itself reads, and handed whole to Client."""
    url: str                  # the endpoint (path-style requests below it)
    scheme: str               # "https", or "http" (loopback only)
    host: str
    port: int
    source: str               # "--endpoint-url", "AWS_ENDPOINT_URL_S3", a profile..., AWS_DEFAULT
    custom: bool              # an endpoint other than AWS's own
    region: str
    proxy: str | None = None  # the proxy requests go through (https only: a CONNECT tunnel)
    ca_bundle: str | None = None
    addressing: str = "path"  # "path", or "virtual" (bucket.host)
    path: str = ""            # the endpoint URL's own path, if any
    credentials: object = field(default=None, compare=False, repr=False)  # botocore's

    @property
    def where(self) -> str:
        return f"from {self.source}" if self.custom else self.source

    def proxy_shown(self) -> str | None:
        """The proxy URL without its user name and password (for messages and logs)."""
        return botocore.httpsession.mask_proxy_url(self.proxy) if self.proxy else None

    def virtual_for(self, bucket: str) -> bool:
        """Whether requests for this bucket name it in the host (bucket.host): with virtual
        addressing, for names that are one DNS label (a dotted name would not match the
        certificate of *.host)."""
        return self.addressing == "virtual" and re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]",
                                                             bucket) is not None


# ---------------------------------------------------------------------------- resolution
def _session(profile: str | None) -> botocore.session.Session:
    bs = botocore.session.Session()
    if profile:
        bs.set_config_variable("profile", profile)
    return bs


def _config_errors(fn, *args, **kw):
    """Call fn, turning a broken AWS configuration into one line and an exit code."""
    try:
        return fn(*args, **kw)
    except botocore.exceptions.ProfileNotFound as e:
        raise StoreSetupError(f"AWS profile {e.kwargs.get('profile')!r} not found") from None
    except (botocore.exceptions.InvalidConfigError, botocore.exceptions.ConfigParseError,
            botocore.exceptions.CredentialRetrievalError,
            botocore.exceptions.PartialCredentialsError) as e:
        raise StoreSetupError(f"AWS configuration: {e}") from None
    except botocore.exceptions.InvalidRegionError as e:
        raise UserError(str(e)) from None


def _profile_name(bs) -> str:
    return bs.get_config_variable("profile") or "default"


def _endpoint_sources(bs: botocore.session.Session):
    """(name, URL) of each place botocore takes an S3 endpoint from, in its order
    (botocore.configprovider.ConfiguredEndpointProvider); used to name the source only."""
    yield "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")
    yield "AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")
    scoped = bs.get_scoped_config()
    profile = _profile_name(bs)
    in_file = os.path.expanduser(str(bs.get_config_variable("config_file")))
    section = scoped.get("services")
    if section:
        s3 = bs.full_config.get("services", {}).get(section, {}).get("s3")
        yield (f"[services {section}] of profile {profile!r} in {in_file}",
               s3.get("endpoint_url") if isinstance(s3, dict) else None)
    yield f"endpoint_url of profile {profile!r} in {in_file}", scoped.get("endpoint_url")


def _configured_endpoint(bs: botocore.session.Session) -> tuple[str | None, str]:
    """The endpoint botocore's own chain gives an S3 client made without endpoint_url, and
    where it came from."""
    if bs.get_config_variable("ignore_configured_endpoint_urls"):
        return None, AWS_DEFAULT
    url = botocore.configprovider.ConfiguredEndpointProvider(
        full_config=bs.full_config, scoped_config=bs.get_scoped_config(),
        client_name="s3").provide()
    if not url:
        return None, AWS_DEFAULT
    # A source botocore reads but this list does not know still gets the rule, under a
    # general name.
    name = next((n for n, v in _endpoint_sources(bs) if v == url), "the AWS configuration")
    return url, name


def _aws_endpoint(bs: botocore.session.Session, region: str) -> str:
    """AWS's own regional endpoint, as botocore resolves it. Making a client connects
    nowhere; the placeholder credentials keep botocore from looking for real ones."""
    # The region goes in the Config: botocore picks the legacy global endpoint for us-east-1
    # when it comes as create_client's argument instead.
    client = bs.create_client(
        "s3", aws_access_key_id="resolve", aws_secret_access_key="resolve",
        config=Config(region_name=region, ignore_configured_endpoint_urls=True,
                      signature_version="s3v4", s3={"addressing_style": "auto"}))
    try:
        return client.meta.endpoint_url
    finally:
        client.close()


def _proxy_for(url: str, scheme: str) -> str | None:
    """The proxy botocore would take from the environment (HTTPS_PROXY, NO_PROXY...) for an
    https endpoint. Plain http (loopback only) never goes through a proxy: the proxy would
    read the keys."""
    if scheme != "https":
        return None
    proxies = botocore.utils.get_environ_proxies(url)
    return botocore.httpsession.ProxyConfiguration(proxies=proxies).proxy_url_for(url) or None


def _addressing(bs, custom: bool, scheme: str, host: str, source: str) -> str:
    """virtual-hosted for AWS, path-style for other endpoints, unless the profile's
    `s3 = addressing_style = ...` says otherwise."""
    s3 = bs.get_scoped_config().get("s3")
    style = (s3.get("addressing_style") if isinstance(s3, dict) else None) or "auto"
    if style not in ("auto", "path", "virtual"):
        raise StoreSetupError(f"AWS configuration: s3 addressing_style {style!r} of profile "
                        f"{_profile_name(bs)!r}: expected auto, path or virtual")
    if style == "auto":
        style = "path" if custom else "virtual"
    if style == "virtual" and scheme == "http":
        # bucket.localhost is a name the rule cannot vouch for: it resolves as the hosts
        # file says, not necessarily to loopback.
        raise SecurityRefusal(f"refusing virtual-hosted addressing over plain http:// to {host} "
                        f"(from {source}): requests would go to BUCKET.{host}, not a loopback "
                        "address; use https:// or addressing_style = path")
    return style


def _ca_bundle(bs, flag: str | None) -> str | None:
    """The CA bundle (--ca-bundle, else AWS_CA_BUNDLE, else the profile's ca_bundle), checked
    to be a readable PEM file: a set but unusable value is refused, never ignored."""
    if flag is not None:
        value, source = flag, "--ca-bundle"
    else:
        value = bs.get_config_variable("ca_bundle")
        source = ("AWS_CA_BUNDLE" if os.environ.get("AWS_CA_BUNDLE") is not None
                  else f"ca_bundle of profile {_profile_name(bs)!r}")
    if value is None:
        return None
    if not str(value).strip():
        raise StoreSetupError(f"{source} is set but empty: name a PEM file of trusted CA "
                        "certificates, or unset it")
    path = os.path.expanduser(str(value))
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise StoreSetupError(f"CA bundle {path} (from {source}): {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise StoreSetupError(f"CA bundle {path} (from {source}): no PEM certificate in it")
    return path


def resolve_transport(endpoint_url: str | None = None, *, profile: str | None = None,
                      region: str | None = None, ca_bundle: str | None = None,
                      session: botocore.session.Session | None = None) -> Transport:
    """Where the store's requests will go, from --endpoint-url or else the configuration
    botocore reads (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's `services` section,
    the profile's endpoint_url; AWS_IGNORE_CONFIGURED_ENDPOINT_URLS turns those off), and how
    (region, addressing style, credentials, CA bundle, proxy). Refuses plain http to anything
    but loopback (SecurityRefusal) before anything else is looked up."""
    bs = session or _session(profile)
    return _config_errors(_resolve, bs, endpoint_url, region, ca_bundle)


def _resolve(bs, endpoint_url, region, ca_bundle) -> Transport:
    if endpoint_url:
        url, source = endpoint_url, "--endpoint-url"
    else:
        url, source = _configured_endpoint(bs)
    parts = check_endpoint(url, source)          # first: nothing else is looked up for it
    region = region or bs.get_config_variable("region") or "us-east-1"
    custom = parts is not None
    if not custom:
        url = _aws_endpoint(bs, region)
        parts = check_endpoint(url, source)
    return Transport(url=url, scheme=parts.scheme, host=parts.hostname,
                     port=parts.port or (443 if parts.scheme == "https" else 80),
                     source=source, custom=custom, region=region,
                     proxy=_proxy_for(url, parts.scheme), ca_bundle=_ca_bundle(bs, ca_bundle),
                     addressing=_addressing(bs, custom, parts.scheme, parts.hostname, source),
                     path=parts.path.rstrip("/"), credentials=bs.get_credentials())
