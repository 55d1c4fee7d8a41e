"""Widget CSP rewriting: realistic OpenAI and Claude metadata, modes, per-widget rules, and properties."""

from __future__ import annotations

import copy
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcpr.proxy import jsonrpc
from mcpr.proxy.rewrite.csp import REWRITTEN_METHODS, CspPolicy, CspRewriter, WidgetRule, is_local_host, source_host
from mcpr.proxy.rewrite.plan import answers_transform
from mcpr.proxy.rewrite.streaming import EventStreamRewriter

PUBLIC = "https://abc.tunnel.example.com"
UPSTREAM_HOST = "mcp.internal"

# What the Apps SDK examples declare, written for a laptop.
OPENAI_META = {
    "openai/widgetCSP": {
        "connect_domains": ["http://localhost:8000", "https://api.mapbox.com"],
        "resource_domains": ["http://localhost:4444", "https://*.oaistatic.com"],
    },
    "openai/widgetPrefersBorder": True,
    "openai/widgetDescription": "A map of pizza places.",
}
# What an MCP Apps (Claude) server declares.
CLAUDE_META = {
    "ui": {
        "csp": {
            "connectDomains": ["http://127.0.0.1:3001", "https://api.open-meteo.com"],
            "resourceDomains": ["http://[::1]:5173", "https://fonts.gstatic.com"],
            "frameDomains": ["https://www.youtube.com", "http://localhost:3001"],
        },
        "prefersBorder": True,
    },
}
HTML = '<div id="root"></div><script type="module" src="http://localhost:4444/pizza.js"></script>'


def rewriter(origin=PUBLIC, **policy) -> CspRewriter:
    return CspRewriter(CspPolicy(**policy), origin, UPSTREAM_HOST)


def shapes(meta: dict) -> dict:
    """Each directive in both shapes, checked to agree, plus the widget domain."""
    openai, claude = meta["openai/widgetCSP"], meta["ui"]["csp"]
    out = {}
    for name, o, c in (("connect", "connect_domains", "connectDomains"),
                       ("resource", "resource_domains", "resourceDomains"),
                       ("frame", "frame_domains", "frameDomains")):
        assert openai.get(o) == claude.get(c), (openai, claude)
        if o in openai:
            out[name] = openai[o]
    out["domain"] = meta.get("openai/widgetDomain")
    return out


class MetaTableTests(SynchronousTestCase):
    """One row per situation: policy, origin, upstream meta → the directives written."""

    rows = [
        ("extend drops localhost, keeps the rest, origin first, never in frame",
         {}, PUBLIC, OPENAI_META,
         {"connect": [PUBLIC, "https://api.mapbox.com"],
          "resource": [PUBLIC, "https://*.oaistatic.com"], "domain": PUBLIC}),
        ("extend on Claude's shape: 127.0.0.1 and ::1 are self-references too",
         {}, PUBLIC, CLAUDE_META,
         {"connect": [PUBLIC, "https://api.open-meteo.com"],
          "resource": [PUBLIC, "https://fonts.gstatic.com"],
          "frame": ["https://www.youtube.com"], "domain": PUBLIC}),
        ("both shapes are merged, in OpenAI then Claude order",
         {}, PUBLIC, {**OPENAI_META, **CLAUDE_META},
         {"connect": [PUBLIC, "https://api.mapbox.com", "https://api.open-meteo.com"],
          "resource": [PUBLIC, "https://*.oaistatic.com", "https://fonts.gstatic.com"],
          "frame": ["https://www.youtube.com"], "domain": PUBLIC}),
        ("the upstream's own host is a self-reference",
         {}, PUBLIC, {"openai/widgetCSP": {"connect_domains": ["https://mcp.internal:8443", "wss://MCP.internal"]}},
         {"connect": [PUBLIC], "resource": [PUBLIC], "domain": PUBLIC}),
        ("configured domains come after the origin, before the kept ones, and not in frame",
         {"domains": ("https://cdn.example.com",)}, PUBLIC, CLAUDE_META,
         {"connect": [PUBLIC, "https://cdn.example.com", "https://api.open-meteo.com"],
          "resource": [PUBLIC, "https://cdn.example.com", "https://fonts.gstatic.com"],
          "frame": ["https://www.youtube.com"], "domain": PUBLIC}),
        ("override drops every upstream entry",
         {"mode": "override", "domains": ("https://cdn.example.com",)}, PUBLIC, CLAUDE_META,
         {"connect": [PUBLIC, "https://cdn.example.com"], "resource": [PUBLIC, "https://cdn.example.com"],
          "frame": [], "domain": PUBLIC}),
        ("direct mode without a public origin: localhost stays, no widget domain",
         {}, None, OPENAI_META,
         {"connect": ["http://localhost:8000", "https://api.mapbox.com"],
          "resource": ["http://localhost:4444", "https://*.oaistatic.com"], "domain": None}),
        ("a local public origin (a tunnel on a local relay) is never written",
         {}, "http://localhost:3000", OPENAI_META,
         {"connect": ["http://localhost:8000", "https://api.mapbox.com"],
          "resource": ["http://localhost:4444", "https://*.oaistatic.com"], "domain": None}),
        ("a local public origin configured as [csp] domain is written: the user said so",
         {"domain": "http://demo.localhost:8080"}, "http://demo.localhost:8080", OPENAI_META,
         {"connect": ["http://demo.localhost:8080", "https://api.mapbox.com"],
          "resource": ["http://demo.localhost:8080", "https://*.oaistatic.com"],
          "domain": "http://demo.localhost:8080"}),
        ("direct mode, override: only configured domains",
         {"mode": "override", "domains": ("https://cdn.example.com",)}, None, OPENAI_META,
         {"connect": ["https://cdn.example.com"], "resource": ["https://cdn.example.com"], "domain": None}),
        ("data:, blob: and wildcards are not self-references",
         {}, PUBLIC, {"openai/widgetCSP": {"resource_domains": ["data:", "blob:", "https://*.example.com",
                                                                "http://*.localhost:5173"]}},
         {"connect": [PUBLIC], "resource": [PUBLIC, "data:", "blob:", "https://*.example.com"],
          "domain": PUBLIC}),
        ("a widget domain alone marks a widget: it gets the public origin",
         {}, PUBLIC, {"openai/widgetDomain": "http://localhost:8000"},
         {"connect": [PUBLIC], "resource": [PUBLIC], "domain": PUBLIC}),
        ("a trailing slash on the origin is dropped",
         {}, PUBLIC + "/", {"openai/widgetCSP": {"connect_domains": []}},
         {"connect": [PUBLIC], "resource": [PUBLIC], "domain": PUBLIC}),
    ]

    def test_rows(self) -> None:
        for name, policy, origin, meta, expected in self.rows:
            original = copy.deepcopy(meta)
            out = rewriter(origin, **policy).rewrite_meta(meta, "ui://widget/pizza-map.html")
            self.assertEqual(meta, original, f"{name}: input mutated")
            self.assertIsNotNone(out, name)
            self.assertEqual(shapes(out), expected, name)
            for key, value in meta.items():
                if key not in ("openai/widgetCSP", "ui", "openai/widgetDomain"):
                    self.assertEqual(out[key], value, f"{name}: {key} changed")

    def test_other_keys_of_the_csp_objects_are_kept(self) -> None:
        meta = {"openai/widgetCSP": {"connect_domains": [], "redirect_domains": ["https://x.example"]},
                "ui": {"csp": {"baseUriDomains": ["https://b.example"]}, "domain": "abc.claudemcpcontent.com"}}
        out = rewriter().rewrite_meta(meta, None)
        self.assertEqual(out["openai/widgetCSP"]["redirect_domains"], ["https://x.example"])
        self.assertEqual(out["ui"]["csp"]["baseUriDomains"], ["https://b.example"])
        self.assertEqual(out["ui"]["domain"], "abc.claudemcpcontent.com")

    def test_no_csp_no_widget_is_left_alone(self) -> None:
        for meta in ({}, {"openai/outputTemplate": "ui://widget/a.html"}, {"ui": {"resourceUri": "ui://a"}},
                     {"progressToken": 3}):
            self.assertIsNone(rewriter(domains=("https://cdn.example.com",)).rewrite_meta(meta, None), meta)

    def test_malformed_meta_is_left_as_is(self) -> None:
        for meta in ("text", None, [], 42,
                     {"openai/widgetCSP": "https://x"},
                     {"openai/widgetCSP": {"connect_domains": "https://x"}},
                     {"openai/widgetCSP": {"connect_domains": [1, 2]}},
                     {"openai/widgetCSP": {"connect_domains": []}, "ui": "nope"},
                     {"ui": {"csp": ["https://x"]}},
                     {"ui": {"csp": {"connectDomains": [None]}}}):
            self.assertIsNone(rewriter().rewrite_meta(meta, None, widget=True), meta)


class WidgetRuleTests(SynchronousTestCase):
    """Which `[[csp.widget]]` rule applies to a widget, by its resource or its tool."""

    rules = (
        WidgetRule("ui://widget/map*", connect=("https://tiles.example.com",), resource=("https://tiles.example.com",),
                   frame=("https://player.example.com",)),
        WidgetRule("ui://widget/*", mode="override", resource=("https://static.example.com",)),
    )

    def test_first_matching_rule_applies(self) -> None:
        csp = rewriter(domains=("https://all.example.com",), widgets=self.rules)
        out = shapes(csp.rewrite_meta(OPENAI_META, "ui://widget/map.html"))
        self.assertEqual(out["connect"], [PUBLIC, "https://all.example.com", "https://tiles.example.com",
                                          "https://api.mapbox.com"])
        self.assertEqual(out["frame"], ["https://player.example.com"])
        out = shapes(csp.rewrite_meta(OPENAI_META, "ui://widget/list.html"))
        self.assertEqual(out["connect"], [PUBLIC, "https://all.example.com"])
        self.assertEqual(out["resource"], [PUBLIC, "https://all.example.com", "https://static.example.com"])
        out = shapes(csp.rewrite_meta(OPENAI_META, "ui://other/app.html"))
        self.assertEqual(out["connect"], [PUBLIC, "https://all.example.com", "https://api.mapbox.com"])

    def test_rule_for_a_tool_uses_its_output_template(self) -> None:
        csp = rewriter(widgets=self.rules)
        result = {"tools": [{"name": "map", "_meta": {"openai/outputTemplate": "ui://widget/map.html",
                                                       **OPENAI_META}},
                            {"name": "app", "_meta": {"ui": {"resourceUri": "ui://widget/list.html"},
                                                      **OPENAI_META}}]}
        self.assertTrue(csp.rewrite_result("tools/list", result))
        first, second = (shapes(t["_meta"]) for t in result["tools"])
        self.assertIn("https://tiles.example.com", first["connect"])
        self.assertEqual(second["resource"], [PUBLIC, "https://static.example.com"])  # override


def rpc_result(id, result) -> dict:
    return {"jsonrpc": "2.0", "id": id, "result": result}


class ResultTests(SynchronousTestCase):
    """rewrite_result on whole MCP answers: resources, tools, batches and SSE-wrapped answers."""

    def test_resources_read_rewrites_meta_and_never_the_html(self) -> None:
        result = {"contents": [{"uri": "ui://widget/pizza-map.html", "mimeType": "text/html+skybridge",
                                "text": HTML, "_meta": copy.deepcopy(OPENAI_META)}]}
        self.assertTrue(rewriter().rewrite_result("resources/read", result))
        (content,) = result["contents"]
        self.assertEqual(content["text"], HTML)
        self.assertEqual(shapes(content["_meta"])["resource"], [PUBLIC, "https://*.oaistatic.com"])

    def test_widget_resource_without_meta_gets_the_public_origin(self) -> None:
        for method, key, item in (
            ("resources/list", "resources", {"uri": "ui://widget/a.html", "name": "a"}),
            ("resources/templates/list", "resourceTemplates",
             {"uriTemplate": "ui://widget/{id}.html", "name": "t"}),
            ("resources/read", "contents", {"uri": "app://x", "mimeType": "text/html;profile=mcp-app",
                                            "text": "<p>"}),
        ):
            result = {key: [dict(item)]}
            self.assertTrue(rewriter().rewrite_result(method, result), method)
            self.assertEqual(shapes(result[key][0]["_meta"]),
                             {"connect": [PUBLIC], "resource": [PUBLIC], "domain": PUBLIC}, method)
            untouched = {key: [dict(item)]}
            self.assertFalse(rewriter(origin=None).rewrite_result(method, untouched), method)
            self.assertEqual(untouched, {key: [item]})

    def test_no_meta_anywhere_is_untouched(self) -> None:
        result = {"tools": [{"name": "add", "inputSchema": {"type": "object"}}],
                  "resources": [{"uri": "demo://greeting", "mimeType": "text/plain"}]}
        before = copy.deepcopy(result)
        for method in REWRITTEN_METHODS:
            self.assertFalse(rewriter().rewrite_result(method, result), method)
        self.assertEqual(result, before)

    def test_legacy_meta_key_and_result_level_meta(self) -> None:
        result = {"content": [{"type": "text", "text": "ok"},
                              {"type": "resource", "resource": {"uri": "ui://widget/a.html", "text": "<p>",
                                                                "meta": copy.deepcopy(CLAUDE_META)}}],
                  "_meta": {"openai/outputTemplate": "ui://widget/a.html", **copy.deepcopy(OPENAI_META)}}
        self.assertTrue(rewriter().rewrite_result("tools/call", result))
        self.assertEqual(shapes(result["_meta"])["connect"], [PUBLIC, "https://api.mapbox.com"])
        embedded = result["content"][1]["resource"]
        self.assertNotIn("_meta", embedded)
        self.assertEqual(shapes(embedded["meta"])["frame"], ["https://www.youtube.com"])

    def test_batch_answers_rewritten_by_id_and_method(self) -> None:
        batch = jsonrpc.parse_value([
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"jsonrpc": "2.0", "id": "r", "method": "resources/read", "params": {"uri": "ui://widget/a.html"}},
            {"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"name": "p"}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
        ])
        transform = answers_transform(batch, rewriter(), {})
        meta = {"openai/widgetCSP": {"connect_domains": ["http://localhost:1"]}}
        answers = [
            rpc_result(3, {"messages": [], "_meta": copy.deepcopy(meta)}),  # not a widget method
            rpc_result("r", {"contents": [{"uri": "ui://widget/a.html", "text": "<p>", "_meta": copy.deepcopy(meta)}]}),
            {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "no"}},
            rpc_result(99, {"tools": [{"name": "x", "_meta": copy.deepcopy(meta)}]}),  # unknown id
        ]
        self.assertTrue(transform(answers))
        self.assertEqual(answers[0]["result"]["_meta"], meta)
        self.assertEqual(shapes(answers[1]["result"]["contents"][0]["_meta"])["connect"], [PUBLIC])
        self.assertEqual(answers[3]["result"]["tools"][0]["_meta"], meta)
        self.assertIsNone(answers_transform(jsonrpc.parse_value({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
                                            rewriter(), {}))


    def test_sse_wrapped_answer(self) -> None:
        batch = jsonrpc.parse_value({"jsonrpc": "2.0", "id": 4, "method": "resources/read",
                                     "params": {"uri": "ui://widget/pizza-map.html"}})
        answer = rpc_result(4, {"contents": [{"uri": "ui://widget/pizza-map.html", "text": HTML,
                                              "_meta": OPENAI_META}]})
        progress = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\r\n\r\n'
        stream = progress + b"event: message\r\nid: 17\r\ndata: " + json.dumps(answer).encode() + b"\r\n\r\n"
        out: list[bytes] = []
        sse = EventStreamRewriter(answers_transform(batch, rewriter(), {}), out.append)
        for i in range(0, len(stream), 50):
            sse.feed(stream[i:i + 50])
        sse.finish()
        body = b"".join(out)
        self.assertTrue(body.startswith(progress + b"event: message\r\nid: 17\r\ndata: "))
        (content,) = json.loads(body[len(progress):].split(b"data: ", 1)[1])["result"]["contents"]
        self.assertEqual(content["text"], HTML)
        self.assertEqual(shapes(content["_meta"])["connect"], [PUBLIC, "https://api.mapbox.com"])


class HostTests(SynchronousTestCase):
    """source_host and is_local_host: what a CSP source names, and whether it is local."""

    def test_source_host(self) -> None:
        for entry, host in (("https://a.example.com", "a.example.com"), ("http://localhost:5173/x", "localhost"),
                            ("localhost:5173", "localhost"), ("ws://[::1]:8000", "::1"), ("data:", None),
                            ("'self'", None), ("https://user@Host.Example:1", "host.example"), ("*.x.com", "*.x.com")):
            self.assertEqual(source_host(entry), host, entry)

    def test_is_local_host(self) -> None:
        for host in ("localhost", "app.localhost", "127.0.0.1", "127.8.9.1", "::1", "0.0.0.0", "::"):
            self.assertTrue(is_local_host(host), host)
        for host in ("example.com", "10.0.0.1", "localhost.example.com", None, ""):
            self.assertFalse(is_local_host(host), host)


# Arbitrary JSON, with the names the rewriter looks for over-represented.
_KEYS = st.sampled_from(["_meta", "meta", "ui", "csp", "openai/widgetCSP", "openai/widgetDomain",
                         "openai/outputTemplate", "resourceUri", "connect_domains", "resource_domains",
                         "frame_domains", "connectDomains", "resourceDomains", "frameDomains", "tools",
                         "resources", "resourceTemplates", "contents", "content", "uri", "uriTemplate",
                         "mimeType", "type", "resource", "text"]) | st.text(max_size=8)
_STRINGS = st.sampled_from(["http://localhost:3000", "https://api.example.com", "ui://widget/a.html",
                            "text/html+skybridge", "resource", "data:", PUBLIC, "https://mcp.internal"]) \
    | st.text(max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _STRINGS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=40,
)
# Results shaped like the real ones, with every part free to be valid, odd or missing.
_DOMAINS = st.lists(_STRINGS, max_size=3)
_OPENAI = st.fixed_dictionaries({}, optional={k: _DOMAINS for k in ("connect_domains", "resource_domains",
                                                                    "frame_domains")})
_CLAUDE = st.fixed_dictionaries({}, optional={k: _DOMAINS for k in ("connectDomains", "resourceDomains",
                                                                    "frameDomains")})
_META = st.fixed_dictionaries({}, optional={
    "openai/widgetCSP": _OPENAI | _JSON,
    "ui": st.fixed_dictionaries({}, optional={"csp": _CLAUDE | _JSON, "resourceUri": _STRINGS}) | _JSON,
    "openai/widgetDomain": _STRINGS,
    "openai/outputTemplate": _STRINGS,
})
_ITEM = st.fixed_dictionaries({}, optional={"uri": _STRINGS, "uriTemplate": _STRINGS, "mimeType": _STRINGS,
                                            "text": _STRINGS, "_meta": _META | _JSON, "meta": _META})
_CONTENT = st.fixed_dictionaries({"type": st.just("resource"), "resource": _ITEM}) | _ITEM
_RESULTS = st.fixed_dictionaries({}, optional={
    "tools": st.lists(_ITEM, max_size=3), "resources": st.lists(_ITEM, max_size=3),
    "resourceTemplates": st.lists(_ITEM, max_size=3), "contents": st.lists(_ITEM, max_size=3),
    "content": st.lists(_CONTENT, max_size=3), "_meta": _META,
})
_POLICIES = st.builds(
    CspPolicy,
    mode=st.sampled_from(["extend", "override"]),
    domains=st.lists(_STRINGS, max_size=2).map(tuple),
    widgets=st.lists(st.builds(WidgetRule, match=st.sampled_from(["ui://widget/*", "*", "nothing"]),
                               mode=st.sampled_from([None, "extend", "override"]),
                               connect=st.lists(_STRINGS, max_size=2).map(tuple),
                               frame=st.lists(_STRINGS, max_size=2).map(tuple)), max_size=2).map(tuple),
)


class PropertyTests(SynchronousTestCase):
    """The rewriter on arbitrary JSON: it never raises, and a second pass changes nothing."""

    @given(_RESULTS | _JSON, _POLICIES, st.sampled_from([PUBLIC, None, "http://127.0.0.1:3000"]),
           st.sampled_from(sorted(REWRITTEN_METHODS)))
    def test_never_raises_and_is_idempotent(self, value, policy, origin, method) -> None:
        csp = CspRewriter(policy, origin, UPSTREAM_HOST)
        once = copy.deepcopy(value)
        csp.rewrite_result(method, once)
        json.dumps(once)  # still JSON
        twice = copy.deepcopy(once)
        self.assertFalse(csp.rewrite_result(method, twice))
        self.assertEqual(twice, once)

    @given(_META | st.dictionaries(_KEYS, _JSON, max_size=6), _POLICIES)
    def test_meta_rewrite_never_raises_and_is_idempotent(self, meta, policy) -> None:
        csp = CspRewriter(policy, PUBLIC, UPSTREAM_HOST)
        once = csp.rewrite_meta(meta, "ui://widget/a.html", widget=True)
        if once is not None:
            self.assertIsNone(csp.rewrite_meta(once, "ui://widget/a.html", widget=True))
