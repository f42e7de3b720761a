"""`GET /metrics` in the Prometheus text format 0.0.4 (lemonade HEAD `prometheus_metrics.cpp` 317-458,
spec head-llm-surface.md §7.6), written by hand: no runtime dependency.

HEAD's metric names, help texts and labels (`model_name`, `checkpoint`, `type`, `device`, `recipe`),
plus ours: `lemonade_model_loads_total` and `lemonade_model_load_seconds`. Every llama-server runs with
`--metrics`; its own `/metrics` is scraped (cached `SCRAPE_CACHE_SECONDS` per backend) and re-exported
under `lemonade_llamacpp_*` with the model labels added. Unlike HEAD, samples are grouped under their
family's `# TYPE` line (HEAD writes every model family's header first and the samples after, which
strict parsers read as families without samples).

Pure parts (`Exposition`, `parse_exposition`, `escape_label_value`) are table-tested; `render` blocks
for at most one scrape per loaded backend (`SCRAPE_TIMEOUT` each).
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_CACHE_SECONDS = 1.0
SCRAPE_TIMEOUT = 1.0
LLAMACPP_PREFIX = "lemonade_llamacpp_"
MODEL_LABELS = ("model_name", "checkpoint", "type", "device", "recipe")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]")
_SAMPLE_SUFFIXES = ("", "_total", "_sum", "_count", "_bucket", "_created")  # a family's sample names


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str | None:
    """None for NaN and infinities (HEAD leaves such samples out)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return None
    return repr(float(value))


def format_labels(labels: list[tuple[str, str]]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


@dataclass
class Family:
    name: str
    help: str = ""
    type: str = "untyped"
    samples: list[str] = field(default_factory=list)  # finished sample lines


class Exposition:
    """Families in the order first described; each family's samples follow its own header."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def family(self, name: str, help_text: str = "", kind: str = "untyped") -> Family:
        found = self._families.get(name)
        if found is None:
            found = self._families[name] = Family(name, help_text, kind)
        else:
            found.help = found.help or help_text
            found.type = kind if found.type == "untyped" else found.type
        return found

    def describe(self, name: str, help_text: str, kind: str) -> None:
        self.family(name, help_text, kind)

    def sample(self, name: str, labels: list[tuple[str, str]], value: float, family: str | None = None) -> None:
        text = format_value(value)
        if text is not None:
            self.family(family or name).samples.append(f"{name}{format_labels(labels)} {text}")

    def text(self) -> str:
        lines = []
        for fam in self._families.values():
            if fam.help:
                lines.append(f"# HELP {fam.name} {escape_help(fam.help)}")
            lines.append(f"# TYPE {fam.name} {fam.type}")
            lines.extend(fam.samples)
        return "\n".join(lines) + "\n"


# -- llama-server's own metrics, re-exported ---------------------------------------------------------


def llamacpp_name(name: str) -> str:
    """`llamacpp:prompt_tokens_total` → `lemonade_llamacpp_prompt_tokens_total` (HEAD
    `normalize_llamacpp_metric_name`)."""
    clean = _NAME_CHARS.sub("_", name)
    if not clean or clean[0].isdigit():
        clean = "_" + clean
    return LLAMACPP_PREFIX + clean.removeprefix("llamacpp_")


def parse_labels(text: str) -> list[tuple[str, str]] | None:
    """`a="x",b="y\\"z"` → pairs (values unescaped); None when malformed."""
    pairs, i = [], 0
    while i < len(text):
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= len(text) or text[eq + 1] != '"':
            return None
        key = text[i:eq].strip().lstrip(",").strip()
        j, value = eq + 2, []
        while j < len(text) and text[j] != '"':
            if text[j] == "\\" and j + 1 < len(text):
                j += 1
                value.append({"n": "\n"}.get(text[j], text[j]))
            else:
                value.append(text[j])
            j += 1
        if j >= len(text) or not key:
            return None
        pairs.append((key, "".join(value)))
        i = j + 1
        while i < len(text) and text[i] in ", ":
            i += 1
    return pairs


def _split_sample(line: str) -> tuple[str, list[tuple[str, str]], str] | None:
    """(name, labels, value text) of a sample line; None when malformed."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        end = line.rfind("}")
        if end < brace:
            return None
        labels = parse_labels(line[brace + 1:end])
        rest = line[end + 1:].strip()
        name = line[:brace]
    else:
        if space <= 0:
            return None
        name, labels, rest = line[:space], [], line[space + 1:].strip()
    if labels is None or not name or not rest:
        return None
    return name, labels, rest.split()[0]


def parse_exposition(text: str, out: Exposition, extra: list[tuple[str, str]]) -> None:
    """Add llama-server's metrics from `text` to `out`, renamed, with the `extra` labels appended
    (a label the backend already set keeps its value). Malformed lines are skipped."""
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(("# HELP ", "# TYPE ")):
            parts = line[7:].split(" ", 1)
            current = llamacpp_name(parts[0])
            rest = parts[1] if len(parts) > 1 else ""
            if line.startswith("# HELP "):
                out.family(current, help_text=rest.replace("\\n", "\n").replace("\\\\", "\\"))
            else:
                out.family(current, kind=rest.strip() or "untyped")
            continue
        if not line or line.startswith("#"):
            continue
        parsed = _split_sample(line)
        if parsed is None:
            continue
        name, labels, value_text = parsed
        try:
            value = float(value_text)
        except ValueError:
            continue
        name = llamacpp_name(name)
        keys = {k for k, _ in labels}
        merged = labels + [(k, v) for k, v in extra if k not in keys]
        family = current if current and name in {current + s for s in _SAMPLE_SUFFIXES} else name
        out.sample(name, merged, int(value) if value.is_integer() and abs(value) < 2 ** 53 else value,
                   family=family)


class BackendScraper:
    """llama-server `/metrics` text per backend URL, fetched at most once per SCRAPE_CACHE_SECONDS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _cache
        self._cache: dict[str, tuple[float, str]] = {}

    def text(self, base_url: str) -> str:
        """The backend's metrics, or "" when it does not answer 200 in time. Blocks up to
        SCRAPE_TIMEOUT; never raises."""
        from lemonade.error_types import NetworkError
        from lemonade.utils import http_client

        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(base_url)
            if cached and now - cached[0] < SCRAPE_CACHE_SECONDS:
                return cached[1]
        try:
            reply = http_client.get_json(base_url + "/metrics", timeout=SCRAPE_TIMEOUT)
            text = reply.body if reply.status == 200 and isinstance(reply.body, str) else ""
        except NetworkError:
            text = ""
        with self._lock:
            self._cache = {url: entry for url, entry in self._cache.items() if now - entry[0] < 60}
            self._cache[base_url] = (time.monotonic(), text)
        return text


# -- the page -----------------------------------------------------------------------------------------

_MODEL_GAUGES = (
    ("lemonade_model_input_tokens", "Latest input token count reported by a model.", "input_tokens"),
    ("lemonade_model_output_tokens", "Latest output token count reported by a model.", "output_tokens"),
    ("lemonade_model_prompt_tokens", "Latest prompt token count reported by a model.", "prompt_tokens"),
    ("lemonade_model_cache_tokens", "Latest prompt tokens served from the backend prefix cache for a model.",
     "cache_tokens"),
    ("lemonade_model_time_to_first_token_seconds", "Latest time to first token reported by a model.",
     "time_to_first_token"),
    ("lemonade_model_tokens_per_second", "Latest generation throughput reported by a model.",
     "tokens_per_second"),
)
_MODEL_COUNTERS = (
    ("lemonade_model_requests_total", "Cumulative inference requests observed for a model.", "requests"),
    ("lemonade_model_input_tokens_total", "Cumulative input tokens observed for a model.", "input_tokens"),
    ("lemonade_model_output_tokens_total", "Cumulative output tokens observed for a model.", "output_tokens"),
    ("lemonade_model_prompt_tokens_total", "Cumulative prompt tokens observed for a model.", "prompt_tokens"),
    ("lemonade_model_cache_tokens_total",
     "Cumulative prompt tokens served from the backend prefix cache for a model.", "cache_tokens"),
)
_TOTALS = (
    ("lemonade_requests_total", "Cumulative inference requests observed by Lemonade.", "requests"),
    ("lemonade_input_tokens_total", "Cumulative input tokens observed by Lemonade.", "input_tokens"),
    ("lemonade_output_tokens_total", "Cumulative output tokens observed by Lemonade.", "output_tokens"),
    ("lemonade_prompt_tokens_total", "Cumulative prompt tokens observed by Lemonade.", "prompt_tokens"),
    ("lemonade_cache_tokens_total", "Cumulative prompt tokens served from backend prefix caches.",
     "cache_tokens"),
)


def model_labels(info, device: str = "cpu") -> list[tuple[str, str]]:
    return [("model_name", info.name), ("checkpoint", info.checkpoint), ("type", info.model_type),
            ("device", device), ("recipe", info.recipe)]


def render(usage, version: str, max_loaded: dict[str, int], backend_texts: dict[str, str],
           system: dict[str, float]) -> str:
    """The page: `usage` is a `router.UsageSnapshot`, `backend_texts` llama-server's metrics by model
    name, `system` the host gauges we could read (`cpu_usage_percent`, `memory_used_gb`)."""
    out = Exposition()
    out.describe("lemonade_server_up", "Whether the Lemonade server is running.", "gauge")
    out.sample("lemonade_server_up", [], 1)
    out.describe("lemonade_server_info", "Lemonade server build information.", "gauge")
    out.sample("lemonade_server_info", [("version", version)], 1)
    out.describe("lemonade_loaded_models", "Number of models currently loaded in Lemonade.", "gauge")
    out.sample("lemonade_loaded_models", [], len(usage.loaded))

    out.describe("lemonade_model_info", "Metadata for each Lemonade model observed by this process.", "gauge")
    out.describe("lemonade_model_loaded", "Whether this model is currently loaded in Lemonade.", "gauge")
    for name, help_text, _ in _MODEL_GAUGES:
        out.describe(name, help_text, "gauge")
    for name, help_text, _ in _MODEL_COUNTERS:
        out.describe(name, help_text, "counter")
    out.describe("lemonade_model_loads_total", "Loads of a model since the server started (ours).", "counter")
    out.describe("lemonade_model_load_seconds",
                 "Duration of the latest load of a model, from the start of its backend to healthy (ours).",
                 "gauge")
    loaded_names = {m.info.name for m in usage.loaded}
    for model in usage.models:
        labels = model_labels(model.info)
        out.sample("lemonade_model_info", labels, 1)
        out.sample("lemonade_model_loaded", labels, 1 if model.info.name in loaded_names else 0)
        if model.last is not None:
            for name, _, attr in _MODEL_GAUGES:
                value = getattr(model.last, attr)
                if value is not None:
                    out.sample(name, labels, value)
        for name, _, attr in _MODEL_COUNTERS:
            out.sample(name, labels, getattr(model.totals, attr))
        out.sample("lemonade_model_loads_total", labels, model.loads)
        if model.loads:
            out.sample("lemonade_model_load_seconds", labels, model.load_seconds)

    for model in usage.loaded:
        text = backend_texts.get(model.info.name)
        if text:
            parse_exposition(text, out, model_labels(model.info))

    out.describe("lemonade_max_loaded_models", "Configured loaded model limit per model type.", "gauge")
    for kind, limit in max_loaded.items():
        out.sample("lemonade_max_loaded_models", [("type", kind)], limit)
    for name, help_text, attr in _TOTALS:
        out.describe(name, help_text, "counter")
        out.sample(name, [], getattr(usage.totals, attr))
    out.describe("lemonade_cpu_usage_percent", "System CPU utilization percentage.", "gauge")
    if "cpu_usage_percent" in system:
        out.sample("lemonade_cpu_usage_percent", [], system["cpu_usage_percent"])
    out.describe("lemonade_memory_used_gb", "System memory usage in GiB.", "gauge")
    if "memory_used_gb" in system:
        out.sample("lemonade_memory_used_gb", [], system["memory_used_gb"])
    return out.text()


def system_gauges() -> dict[str, float]:
    """CPU use since the previous call (psutil, non-blocking) and memory in use, as HEAD reports them."""
    import psutil

    memory = psutil.virtual_memory()
    return {"cpu_usage_percent": psutil.cpu_percent(interval=None),
            "memory_used_gb": round((memory.total - memory.available) / 2 ** 30, 1)}
