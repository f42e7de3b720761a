"""Table tests of the pure parts of `lemonade.server.security` (keys, origins, route classes) and of the
Prometheus text of `lemonade.server.metrics`, parsed back with `prometheus_client`'s own parser.

The origin cases are those of lemonade HEAD's `test/cpp/test_origin_utils.cpp`, plus ours."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lemonade.server import metrics, security
from lemonade.server.routes import ROUTES, Auth, Route
from lemonade.server.security import Keys, Origin, OriginPolicy, parse_origin
from lemonade.wrapped_server import CallFigures, Totals


# -- origins --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("http://localhost:3000", Origin("http", "localhost", 3000)),
    ("https://app.lemonade.dev", Origin("https", "app.lemonade.dev")),
    ("HTTP://LocalHost:8080", Origin("http", "localhost", 8080)),
    ("http://[::1]:8080", Origin("http", "[::1]", 8080)),
    ("https://[2001:db8::1]:8443", Origin("https", "[2001:db8::1]", 8443)),
    ("https://example.com/", Origin("https", "example.com")),
    ("app.lemonade.dev", Origin("", "app.lemonade.dev")),
    ("app.lemonade.dev:8080", Origin("", "app.lemonade.dev", 8080)),
    ("2001:db8::1", Origin("", "2001:db8::1")),
    ("null", Origin("", "null")),
    ("  NULL ", Origin("", "null")),
    ("file://", Origin("file", "file")),
    ("tauri://localhost", Origin("tauri", "localhost")),
    ("app://x/some/path", Origin("app", "x")),  # a path is only refused on web schemes
    # refused
    ("https://example.com/some/path", None),
    ("https://example.com?query=1", None),
    ("https://example.com#fragment", None),
    ("https://user:pass@example.com", None),
    ("https://app.example.com:999999999999999", None),
    ("https://app.example.com:65536", None),
    ("https://app.example.com:", None),
    ("https://app.example.com:8a", None),
    ("https://[2001:db8::1]:443junk", None),
    ("https://[2001:db8::1]junk", None),
    ("https://[2001:db8::1", None),
    ("", None),
    ("   ", None),
])
def test_parse_origin(text, expected):
    assert parse_origin(text) == expected


@pytest.mark.parametrize("origin,setting,host,allowed", [
    # loopback and desktop-app origins: always
    ("http://localhost:3000", "", None, True),
    ("http://127.0.0.1:13305", "", None, True),
    ("http://[::1]:1", "", None, True),
    ("https://tauri.localhost", "", None, True),
    ("file://", "", None, True),
    ("app://lemonade", "", None, True),
    ("chrome-extension://abcdef", "", None, True),
    # foreign: refused unless listed
    ("https://evil.example", "", None, False),
    ("http://localhost.evil.example", "", None, False),
    ("http://127.0.0.1.evil.example", "", None, False),
    ("https://app.example.com", "https://app.example.com", None, True),
    ("https://app.example.com:443", "https://app.example.com", None, True),  # default port
    ("http://app.example.com", "https://app.example.com", None, False),  # scheme differs
    ("https://app.example.com:8443", "https://app.example.com", None, False),
    ("https://other.example.com", "https://app.example.com, https://other.example.com", None, True),
    ("https://app.example.com", "app.example.com", None, False),  # an item needs a scheme
    ("https://anything.example", "*", None, True),
    ("https://anything.example", "https://a.example, *", None, True),  # ours: `*` inside a list
    # the opaque origin (sandboxed frames, no-referrer pages): only when listed
    ("null", "", None, False),
    ("null", "*", None, True),
    ("null", "https://a.example,null", None, True),
    ("http://null", "null", None, False),
    # malformed: refused
    ("https://evil.example/path", "*", None, False),
    ("", "*", None, False),
    # the web UI served from an IP literal (ours): its own origin, never a DNS name
    ("http://192.168.1.5:13305", "", "192.168.1.5:13305", True),
    ("http://192.168.1.5:13305", "", "192.168.1.5:8000", False),
    ("http://[fd00::5]:13305", "", "[fd00::5]:13305", True),
    ("http://myhost.lan:13305", "", "myhost.lan:13305", False),  # DNS rebinding would pass that
    ("http://192.168.1.5", "", "192.168.1.5:80", True),
    ("http://192.168.1.5:13305", "", None, False),
])
def test_origin_policy(origin, setting, host, allowed):
    assert OriginPolicy.parse(setting).allows(origin, host) is allowed


@pytest.mark.parametrize("method,site,refused", [
    ("POST", "cross-site", True),
    ("POST", "same-site", True),  # another port of this host is the same site: it sends an Origin
    ("DELETE", "cross-site", True),
    ("PUT", " Cross-Site ", True),
    ("POST", "same-origin", False),
    ("POST", "none", False),  # typed by the user
    ("POST", None, False),  # curl, SDKs: no Fetch Metadata
    ("GET", "cross-site", False),  # a link to the web UI from another site
    ("OPTIONS", "cross-site", False),
])
def test_cross_site_without_origin(method, site, refused):
    assert security.cross_site_without_origin(method, site) is refused


def test_cors_headers_without_origin_are_gas():
    assert dict(security.cors_headers(None, None, False)) == {
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization", "Vary": "Origin"}


def test_cors_headers_echo_origin_preflight_headers_and_pna():
    headers = dict(security.cors_headers("http://localhost:5173", "content-type, x-api-key, anthropic-version",
                                         True))
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert headers["Access-Control-Allow-Headers"] == "content-type, x-api-key, anthropic-version"
    assert headers["Access-Control-Allow-Private-Network"] == "true"
    assert headers["Vary"] == "Origin"
    plain = dict(security.cors_headers("http://localhost:5173", "x\r\nSet-Cookie: a=b", False))
    assert plain["Access-Control-Allow-Headers"] == security.ALLOW_HEADERS  # not a header-name list: not echoed
    assert "Access-Control-Allow-Private-Network" not in plain


# -- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization,x_api_key,expected", [
    ("Bearer k1", None, ["k1"]),
    ("bearer k1", None, ["k1"]),
    ("BEARER   k1  ", None, ["k1"]),
    (None, "k2", ["k2"]),
    (None, "  k2 ", ["k2"]),
    ("Bearer k1", "k2", ["k1", "k2"]),
    ("Basic dXNlcjpwYXNz", None, []),
    ("Bearer", None, []),
    ("Bearer ", None, []),
    ("", "", []),
    (None, None, []),
])
def test_presented_credentials(authorization, x_api_key, expected):
    assert security.presented_credentials(authorization, x_api_key) == expected


BOTH = Keys("user", "admin")
API_ONLY = Keys("user")
ADMIN_ONLY = Keys("", "admin")
NONE = Keys()


@pytest.mark.parametrize("keys,needed,presented,accepted", [
    # both keys: the user key opens the API routes, the admin key everything
    (BOTH, Auth.API, [], False), (BOTH, Auth.API, ["wrong"], False), (BOTH, Auth.API, ["user"], True),
    (BOTH, Auth.API, ["admin"], True), (BOTH, Auth.ADMIN, [], False), (BOTH, Auth.ADMIN, ["user"], False),
    (BOTH, Auth.ADMIN, ["admin"], True), (BOTH, Auth.PUBLIC, [], True),
    (BOTH, Auth.ADMIN, ["wrong", "admin"], True),  # Bearer and x-api-key: either may carry it
    # only the API key: it is the admin key too (HEAD)
    (API_ONLY, Auth.API, [], False), (API_ONLY, Auth.API, ["user"], True),
    (API_ONLY, Auth.ADMIN, ["user"], True), (API_ONLY, Auth.ADMIN, ["wrong"], False),
    # only the admin key: the API routes are open, /internal needs it
    (ADMIN_ONLY, Auth.API, [], True), (ADMIN_ONLY, Auth.API, ["wrong"], True),
    (ADMIN_ONLY, Auth.ADMIN, [], False), (ADMIN_ONLY, Auth.ADMIN, ["admin"], True),
    # none: open
    (NONE, Auth.API, [], True), (NONE, Auth.ADMIN, [], True),
    # a prefix or an extension of the key is not the key
    (BOTH, Auth.API, ["use"], False), (BOTH, Auth.API, ["user "], False), (BOTH, Auth.API, ["userx"], False),
    (Keys("ключ"), Auth.API, ["ключ"], True),  # any characters the environment can hold
])
def test_key_hierarchy(keys, needed, presented, accepted):
    assert security.key_accepted(needed, keys, presented) is accepted


def test_keys_never_show_in_repr():
    text = repr(Keys("secret-user", "secret-admin")) + str(Keys("secret-user"))
    assert "secret" not in text and "set" in text


def test_admin_key_falls_back_to_api_key():
    assert Keys("k").admin == "k" and Keys("k", "").admin == "k" and Keys("", "a").api == ""


@pytest.mark.parametrize("path,expected", [
    ("/api/v1/health", Auth.API), ("/api/chat", Auth.API), ("/v1/messages", Auth.API), ("/v0/x", Auth.API),
    ("/metrics", Auth.API), ("/internal/shutdown", Auth.ADMIN), ("/internal/", Auth.ADMIN),
    ("/live", Auth.PUBLIC), ("/", Auth.PUBLIC), ("/webapp.html", Auth.PUBLIC), ("/static/x.js", Auth.PUBLIC),
    ("/api", Auth.PUBLIC), ("/v1", Auth.PUBLIC), ("/internal", Auth.PUBLIC), ("/metrics/x", Auth.PUBLIC),
    ("/apix/y", Auth.PUBLIC),
])
def test_path_class(path, expected):
    assert security.path_class(path) is expected


def test_a_row_is_never_weaker_than_its_path():
    """A row that says PUBLIC under /api/ still needs the API key; a stricter row keeps its class."""
    assert security.required_class(Route("GET", "/api/v1/x", "x", auth=Auth.PUBLIC), "/api/v1/x") is Auth.API
    assert security.required_class(Route("POST", "/api/v1/x", "x", auth=Auth.ADMIN), "/api/v1/x") is Auth.ADMIN
    assert security.required_class(None, "/internal/nope") is Auth.ADMIN


def test_every_route_row_is_guarded_as_heads_table_says():
    """The classes of HEAD's table (§4.1), for every row of ours: new rows are checked as they come."""
    for route in ROUTES:
        needed = security.required_class(route, route.prefix)
        if route.path.startswith("/internal/"):
            assert needed is Auth.ADMIN, route
        elif route.path.startswith(("/api/", "/v0/", "/v1/")) or route.path == "/metrics":
            assert needed is Auth.API, route
        else:
            assert needed is Auth.PUBLIC, route


@pytest.mark.parametrize("host,keys,expected", [
    ("127.0.0.1", NONE, None), ("localhost", NONE, None), ("::1", NONE, None), ("127.0.0.2", NONE, None),
    ("0.0.0.0", API_ONLY, None), ("0.0.0.0", BOTH, None),
    ("0.0.0.0", NONE, "without an API key"), ("192.168.1.5", NONE, "without an API key"),
    ("::", NONE, "without an API key"), ("myhost.lan", NONE, "without an API key"),
    ("0.0.0.0", ADMIN_ONLY, "with only an admin API key set"),
])
def test_unsecured_bind_warning(host, keys, expected):
    warning = security.unsecured_bind_warning(host, keys)
    assert (warning is None) if expected is None else (expected in warning and f"'{host}'" in warning)


# -- metrics text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value,escaped", [
    ("plain", "plain"), ('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb"), ('\\"\n', '\\\\\\"\\n'),
])
def test_label_values_are_escaped(value, escaped):
    assert metrics.escape_label_value(value) == escaped


@pytest.mark.parametrize("value,text", [
    (0, "0"), (12, "12"), (True, "1"), (0.5, "0.5"), (1e-7, "1e-07"), (float("nan"), None),
    (float("inf"), None),
])
def test_format_value(value, text):
    assert metrics.format_value(value) == text


def test_exposition_groups_samples_under_their_family_and_parses():
    out = metrics.Exposition()
    out.describe("x_total", "Things.", "counter")
    out.describe("y", "A gauge\nwith a newline and a \\.", "gauge")
    out.sample("y", [("name", 'we"ird\\\nlabel')], 2.5)
    out.sample("x_total", [("a", "1")], 3)
    out.sample("x_total", [("a", "2")], 4)
    out.sample("y", [], float("nan"))  # left out
    text = out.text()
    assert text.index("x_total{a=\"2\"}") < text.index("# HELP y")  # grouped
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["x"].type == "counter" and [s.value for s in families["x"].samples] == [3, 4]
    (sample,) = families["y"].samples
    assert sample.labels == {"name": 'we"ird\\\nlabel'} and sample.value == 2.5
    assert families["y"].documentation == "A gauge\nwith a newline and a \\."


LLAMA_TEXT = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 5.5
llamacpp:labelled{slot="0",model_name="theirs"} 1
broken line without value
llamacpp:bad_value{a="1"} notanumber
"""


def test_llamacpp_metrics_are_renamed_labelled_and_merged():
    out = metrics.Exposition()
    for name in ("m1", "m2"):
        metrics.parse_exposition(LLAMA_TEXT, out, [("model_name", name), ("recipe", "llamacpp")])
    families = {f.name: f for f in text_string_to_metric_families(out.text())}
    tokens = families["lemonade_llamacpp_prompt_tokens"]
    assert tokens.type == "counter"
    assert [(s.labels["model_name"], s.value) for s in tokens.samples] == [("m1", 12), ("m2", 12)]
    assert families["lemonade_llamacpp_predicted_tokens_seconds"].samples[0].value == 5.5
    labelled = families["lemonade_llamacpp_labelled"].samples
    assert labelled[0].labels == {"slot": "0", "model_name": "theirs", "recipe": "llamacpp"}  # theirs kept
    assert "lemonade_llamacpp_bad_value" not in families


@pytest.mark.parametrize("name,renamed", [
    ("llamacpp:prompt_tokens_total", "lemonade_llamacpp_prompt_tokens_total"),
    ("llamacpp:kv-cache.usage", "lemonade_llamacpp_kv_cache_usage"),
    ("other", "lemonade_llamacpp_other"), ("9lives", "lemonade_llamacpp__9lives"),
])
def test_llamacpp_names(name, renamed):
    assert metrics.llamacpp_name(name) == renamed


# -- the counters /metrics sums ----------------------------------------------------------------------


@pytest.mark.parametrize("body,expected", [
    ({}, CallFigures()),
    ({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}, CallFigures(7, 3, 0.0, 0.0, 7, None)),
    ({"usage": {"prompt_tokens": 7, "completion_tokens": 3},
      "timings": {"prompt_n": 5, "predicted_n": 4, "prompt_ms": 250.0, "predicted_per_second": 20.0, "cache_n": 2}},
     CallFigures(5, 4, 0.25, 20.0, 7, 2)),
    ({"usage": "junk", "timings": []}, CallFigures()),
])
def test_call_figures(body, expected):
    assert CallFigures.from_body(body) == expected


def test_totals_count_requests_and_sum_tokens():
    totals = Totals()
    totals.add(CallFigures(5, 4, 0.1, 2.0, 7, 2))
    totals.add(CallFigures(3, 1, 0.1, 2.0, None, None))  # no usage.prompt_tokens: the input tokens count
    totals.add(None)  # an answered embedding: a request, no tokens
    assert totals == Totals(requests=3, input_tokens=8, output_tokens=5, prompt_tokens=10, cache_tokens=2)
