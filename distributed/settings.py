"""Typed settings: the only reader of env files and ``TARS_*`` variables.

Precedence (highest first): explicit overrides (CLI flags) > process environment
> the env file (``env/.env.pc1`` ...) > defaults. A bad value stops start-up
with a ``ConfigError`` naming the variable and what it accepts.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigError

ENV_PREFIX = "TARS_"
DEFAULT_MODELS_DIR = Path.home() / ".cache" / "tars" / "models"


def _default_node_name() -> str:
    return (socket.gethostname().split(".")[0] or "node").lower()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        env_file_encoding="utf-8",
        validate_default=True,
    )

    # --- identity and network
    node_name: str = Field(default_factory=_default_node_name, min_length=1, max_length=64,
                           pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                           description="Name of this host in the cluster (letters, digits, . _ -).")
    host: str = Field("127.0.0.1", description="Address the node binds to (0.0.0.0 for the LAN).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the node (1-65535).")
    advertise_url: str = Field("", description="URL peers use to reach this node; default http://HOST:PORT.")
    peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated base URLs of peers to join, e.g. http://192.168.1.10:8000.")
    role: Literal["auto", "server", "worker", "standalone"] = Field(
        "auto", description="auto (server without peers, worker with peers), server, worker or standalone.")
    cluster_name: str = Field("tars", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                              description="Name of the cluster this node belongs to, advertised on the LAN (letters, "
                                          "digits, . _ -); setup_pc2.sh without an address joins the one cluster it finds.")
    discovery: Literal["on", "off"] = Field(
        "on", description="on: advertise this node on the LAN over mDNS (_tars._tcp: cluster, node, port, version; never "
                          "the token) when it listens beyond loopback; off: silent (TARS_PEERS only).")
    planner_priority: int = Field(
        0, ge=-1000, le=1000, description="Which host plans the cluster: the live host with the highest priority, then "
                                          "the most VRAM, then the smallest name (-1000-1000).")
    ollama_port: int = Field(0, ge=0, le=65535, description="A second port (on TARS_HOST) serving the same API, for apps "
                                                            "that only talk to Ollama's port (11434); 0 = off.")

    # --- security
    cluster_token: SecretStr = Field(SecretStr(""), description="Shared secret every /rpc call must carry.")
    api_key: SecretStr = Field(SecretStr(""), description="If set, every endpoint but /health needs 'Authorization: Bearer <key>'.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra comma-separated names this node answers to in the Host header (besides loopback, its own "
                    "addresses, its node and host name); '.example.lan' allows a domain, '*' anything.")
    tls_cert: str = Field("", description="PEM certificate file: serve HTTPS (with TARS_TLS_KEY). scripts/setup_pc1.sh --tls writes one.")
    tls_key: str = Field("", description="PEM private key file of TARS_TLS_CERT.")
    tls_pins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated SHA-256 fingerprints of peer certificates this node trusts for https:// peers "
                    "(self-signed, pinned; no CA). Its own certificate is always trusted.")

    # --- hardware and models
    gpu_profile: str = Field("", description="Simulated hardware: a preset (rtx3060-12gb, gtx1660s-6gb, cpu, ...) or a path to a JSON profile. Empty = detect.")
    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="Folder where pulled and assembled models live.")
    state_dir: Path | None = Field(
        None, description="Folder for this node's replicated cluster state and the peers it remembers "
                          "(tars-state-<node>.json, tars-known-peers-<node>.json); empty = TARS_MODELS_DIR.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated model ids this cluster serves; empty = the embedded defaults.")
    vram_reserve_mb: int = Field(500, ge=0, le=65536, description="VRAM kept free on every GPU, MB (0-65536).")
    context: int = Field(8192, ge=128, le=131072, description="Context window for chat models, tokens (128-131072), "
                         "per request (each engine slot); a model trained on less gets its own.")
    threads: int = Field(0, ge=0, le=512, description="CPU threads for llama.cpp; 0 = llama.cpp's rule: the physical cores this process may use.")
    fallback: bool = Field(True, description="Load a dead peer's model here when it fits (true/false).")
    split: Literal["auto", "off"] = Field(
        "auto", description="auto: a GGUF chat model no single GPU holds is split by layers across hosts' GPUs (llama.cpp RPC through the token-checked relay); off: never.")
    split_port: int = Field(0, ge=0, le=65535, description="TCP port of this host's split relay (peers' engines reach its RPC worker through it, cluster token first); 0 = TARS_PORT + 1.")
    backend_override: str = Field("", description="Force every model onto one backend (e.g. 'fake' for tests).")
    chat_engine: Literal["auto", "server", "inprocess"] = Field(
        "auto", description="GGUF chat engine: server (llama.cpp's llama-server child per model, many requests at once), "
                            "inprocess (llama-cpp-python, one at a time) or auto (server when built, else inprocess).")
    parallel: int = Field(4, ge=1, le=256, description="Slots of a llama-server chat engine: requests it generates at once "
                          "(each with TARS_CONTEXT tokens of context; the planner may lower it where VRAM is short).")
    engine_cache_mb: int = Field(
        0, ge=0, le=1_000_000, description="RAM, MB, a llama-server chat engine may fill with the states of finished "
                                           "prompts, reused by later requests that share their start (its --cache-ram); "
                                           "0 = off. The planner does not count it: left at llama.cpp's default (8 GB) "
                                           "it grows the engine by ~1.5 MB per request until full.")
    engine_bin: str = Field("", description="The llama-server binary (or its folder); empty = the scripts/build_engine.sh "
                            "build matching the installed llama-cpp-python.")
    speculative: Literal["auto", "off", "ngram", "draft"] = Field(
        "auto", description="Speculative decoding of llama-server chat engines (greedy output is unchanged): ngram "
                            "(draftless: guesses from text already in the context, no extra memory), draft (the "
                            "model's draft model, a catalog field or POST /models option, planned beside it), off, "
                            "or auto: the draft where one is planned, else n-gram (it paid at 1 and 4 slots on a quiet "
                            "host; a CPU host busy with other work may prefer off: docs/BENCHMARKS.md).")
    fake_token_delay_s: float = Field(0.0, ge=0, le=10, description="With TARS_BACKEND_OVERRIDE=fake: seconds each "
                                      "generated token takes, so fake models keep a host busy (tests of load balancing).")
    embed_runtime: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="Runtime of embedding and rerank models: torch, onnx (ONNX Runtime), openvino, or auto (each "
                            "measured on this host at a model's first load, the fastest kept whose output matches "
                            "torch's, cosine >= 0.999; exports and the choice are cached under TARS_MODELS_DIR/runtimes).")

    # --- cluster timing
    heartbeat_s: float = Field(2.0, gt=0, le=300, description="Seconds between heartbeats (>0).")
    rpc_timeout_s: float = Field(5.0, gt=0, le=600, description="Timeout of a control call to a peer, seconds.")
    connect_timeout_s: float = Field(
        1.0, gt=0, le=60, description="Seconds a connection to a peer may take to open, and data sent to it may stay "
                                      "unacknowledged (TCP_USER_TIMEOUT), before the peer counts as unreachable and its "
                                      "models are served elsewhere; sized for a LAN.")

    # --- serving limits
    queue_size: int = Field(16, ge=1, le=10000, description="Waiting generations per model before 429.")
    queue_max_wait_s: float = Field(
        10.0, ge=0, le=86400, description="A generation that would wait longer than this for a free slot (estimated from "
                                          "how long slots have recently been held) is refused at once with 429 and "
                                          "Retry-After instead of queued; 0 = no bound but TARS_QUEUE_SIZE.")
    request_timeout_s: float = Field(300.0, gt=0, le=86400, description="Longest a request may take, seconds.")
    routing: Literal["cache", "least-loaded"] = Field(
        "cache", description="How a model with several replicas picks one: cache (a request whose prompt starts as a recent "
                             "one's goes to the replica that computed it, and to the same llama-server slot, so its prefill "
                             "is reused) or least-loaded (the replica with the least in flight; llama-server picks the slot).")
    cache_route_slack: int = Field(
        2, ge=0, le=10000, description="TARS_ROUTING=cache: the replica holding a prompt's start is passed over when it has "
                                       "more than this many requests in flight beyond the least loaded one (a wait for a "
                                       "slot, or a crowded replica, costs more than one prefill).")
    embed_max_batch: int = Field(64, ge=1, le=4096, description="Most sentences in one embedding batch.")
    embed_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="Longest an embedding waits for its batch to fill, ms.")
    rerank_max_documents: int = Field(1000, ge=1, le=100000, description="Most documents one rerank request may send (more: 400).")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted, bytes.")
    embed_max_inputs: int = Field(2048, ge=1, le=1_000_000, description="Most texts in one embedding request (400 beyond).")
    max_connections: int = Field(0, ge=0, le=1_000_000, description="Open client connections at most; 0 = derived from the process's file limit (RLIMIT_NOFILE).")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="Seconds a client has to send a request's headers, and the longest pause while it sends a body.")
    keepalive_s: float = Field(5.0, gt=0, le=600, description="Seconds an idle keep-alive connection stays open.")

    # --- logging
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug, info, warning or error.")
    log_format: Literal["text", "json"] = Field("text", description="text or json (structured, one object a line).")

    @field_validator("peers", "models", "allowed_hosts", "tls_pins", mode="before")
    @classmethod
    def _split_csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("peers")
    @classmethod
    def _check_peers(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"'{url}' is not a base URL; write it as http://HOST:PORT")
        return [u.rstrip("/") for u in v]

    @field_validator("tls_pins")
    @classmethod
    def _check_pins(cls, v: list[str]) -> list[str]:
        out = []
        for fp in v:
            hexfp = fp.lower().removeprefix("sha256:").replace(":", "")
            if len(hexfp) != 64 or any(c not in "0123456789abcdef" for c in hexfp):
                raise ValueError(f"'{fp[:80]}' is not a SHA-256 certificate fingerprint (64 hex digits)")
            out.append(hexfp)
        return out

    @field_validator("models_dir", "state_dir", mode="before")
    @classmethod
    def _expand_home(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):  # set but empty: the default
            return DEFAULT_MODELS_DIR if info.field_name == "models_dir" else None
        return Path(v).expanduser()  # "~/models" in an env file means the user's home  # "~/models" in an env file means the user's home

    @field_validator("log_level", "log_format", "role", "split", "chat_engine", "discovery", "speculative",
                     mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    # ----------------------------------------------------------------- derived
    @property
    def base_url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def state_folder(self) -> Path:
        """Where this node's own state files live (TARS_STATE_DIR, else TARS_MODELS_DIR)."""
        return self.state_dir if self.state_dir is not None else self.models_dir

    @property
    def relay_port(self) -> int:
        """The split relay's port (TARS_SPLIT_PORT, else TARS_PORT + 1)."""
        return self.split_port or (self.port + 1 if self.port < 65535 else self.port - 1)

    @property
    def effective_role(self) -> str:
        if self.role != "auto":
            return self.role
        return "worker" if self.peers else "server"

    def redacted(self) -> dict[str, Any]:
        """The effective settings for /config: secrets shown only as set/unset."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                out[name] = "***" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        return out

    def check_for_serving(self) -> None:
        """Refuse combinations that are unsafe to serve with."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TARS_TLS_CERT and TARS_TLS_KEY go together: set both (scripts/setup_pc1.sh --tls "
                              "writes them) or neither")
        for var, path in (("TARS_TLS_CERT", self.tls_cert), ("TARS_TLS_KEY", self.tls_key)):
            if path and not Path(path).expanduser().is_file():
                raise ConfigError(f"{var}={path}: no such file")
        if self.peers and not self.cluster_token.get_secret_value():
            raise ConfigError(
                "TARS_PEERS is set but TARS_CLUSTER_TOKEN is empty: the /rpc channel refuses "
                "unauthenticated peers. Copy the token printed by scripts/setup_pc1.sh into "
                "TARS_CLUSTER_TOKEN (env/.env.pc2).")


def _describe(name: str) -> str:
    f = Settings.model_fields.get(name)
    return (f.description or "") if f else ""


def load_settings(env_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build settings from env file + environment + overrides, or raise ConfigError."""
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigError(f"env file '{env_file}' does not exist")
    try:
        return Settings(_env_file=env_file,  # type: ignore[call-arg]  # pydantic-settings' own init argument
                        **{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            var = ENV_PREFIX + name.upper()
            got = err.get("input")
            accepts = _describe(name)
            problems.append(f"{var}={got!r}: {err['msg']}" + (f" — accepts: {accepts}" if accepts else ""))
        raise ConfigError("invalid settings: " + "; ".join(problems), variables=[p.split("=")[0] for p in problems]) from None
