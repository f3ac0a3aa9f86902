"""Config of the hybrid server (recipes/serve.py): where it listens, its engines, its router, its scale-out."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import ClassVar, List, Optional

from data_pipelines import DataConfig
from home_rl.context_length import fit_lengths, key_limit, model_context
from home_rl.errors import ConfigError
from home_rl.experts import EXPERTS, FAST
from home_rl.resources import Resources, resources_field
from home_rl.router.config import DEFAULT_ROUTER_OUTPUT


@dataclasses.dataclass
class EngineConfig:
    dtype: str = "bfloat16"  # the engines' dtype: float32 | bfloat16 | float16 (bfloat16 on a CPU without it: float32, with a warning)
    max_model_len: int = 2048  # context of each engine (prompt + response tokens); a longer request is a 400 (unset: lowered to the model's context where that is less)
    max_tokens: int = 512  # response tokens when a request names no max_tokens (capped by what the context leaves; unset: lowered to max_model_len)
    stop: List[str] = dataclasses.field(default_factory=lambda: ["</answer>"])  # a response also stops after any of these (kept in the output), as in rollout
    max_num_seqs: int = 256  # most sequences one engine step batches together (continuous batching)
    enforce_eager: bool = True  # skip torch.compile / CUDA graphs: start-up in seconds; false: faster decoding after a longer start
    enable_prefix_caching: bool = True  # reuse the KV cache of a shared prompt prefix (the system prompt, earlier turns)
    kv_cache_gib: float = 2.0  # KV-cache memory per engine in GiB (CPU build; also caps it on GPUs), 0: let vLLM size it
    gpu_memory_utilization: float = 0.4  # CUDA build: fraction of a GPU each engine may take (0.4: both views fit one GPU)
    tensor_parallel_size: int = 1  # CUDA build: GPUs one engine shards its view over
    limit_images_per_prompt: int = 4  # most images one request may carry
    cpu_threads_bind: str = "split"  # CPU build, VLLM_CPU_OMP_THREADS_BIND of the engines: split (think on the upper half of this process's cores, fast on the lower half: never one core for both) | auto (vLLM's choice: the same cores for both) | a core list for both ("0-3")
    seed: int = 0  # engine seed (a request's own seed is honoured on CUDA; the CPU build cannot seed per request)
    lora_engine: str = "auto"  # a LoRA think expert: adapter (one engine serves both experts: the fast view, think's adapter per request) | merged (an engine per view, the adapter merged into the think view) | auto: adapter on GPUs, merged on CPUs (vLLM's CPU LoRA path generated 5.5x slower than the merged view: benchmarks/lora_engine.py)

    CHOICES: ClassVar[dict] = {"dtype": ("float32", "bfloat16", "float16"), "lora_engine": ("auto", "adapter", "merged")}

    def serves_adapter(self) -> bool:
        """`lora_engine` with auto decided (on the machine the engines run on): whether one engine serves both experts."""
        from home_rl import vllm_names as vn

        return self.lora_engine == "adapter" or (self.lora_engine == "auto" and not vn.is_cpu())

    def __post_init__(self):
        for key in ("max_model_len", "max_tokens", "max_num_seqs", "tensor_parallel_size", "limit_images_per_prompt"):
            if getattr(self, key) < 1:
                raise ConfigError(f"engine.{key} must be at least 1, got {getattr(self, key)}")
        if self.kv_cache_gib < 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("engine.kv_cache_gib must be >= 0 and engine.gpu_memory_utilization in (0, 1]")


@dataclasses.dataclass
class PromptConfig:
    template: str = "auto"  # how chat messages are rendered, as data.template rendered them in training: auto (the default template: its expert's system prompt) | row (the messages unchanged) | a template name
    few_shot: int = 0  # worked example exchanges put before the question, as data.few_shot in training
    min_pixels: Optional[int] = None  # images are resized to at least this many pixels (None: the processor's own setting)
    max_pixels: Optional[int] = None  # images are resized to at most this many pixels (None: the processor's own setting)

    def data_config(self) -> DataConfig:
        """The rendering settings as data_pipelines.render_prompt reads them."""
        return DataConfig(template=self.template, few_shot=self.few_shot, min_pixels=self.min_pixels,
                          max_pixels=self.max_pixels)


@dataclasses.dataclass
class RoutingConfig:
    template: str = FAST  # which expert's rendering of a prompt the router reads (as the router stage and evaluation read it)
    batch_size: int = 8  # prompts whose router features one forward pass computes (requests waiting together are batched)
    device: str = "auto"  # where the router's forward runs: auto (cuda when there is a GPU) | cpu | cuda

    CHOICES: ClassVar[dict] = {"template": EXPERTS, "device": ("auto", "cpu", "cuda")}

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"router.batch_size must be at least 1, got {self.batch_size}")


@dataclasses.dataclass
class RayServeConfig:
    min_replicas: int = 1  # replicas per view at least (each holds one vLLM engine)
    max_replicas: int = 1  # replicas per view at most: above min_replicas, Ray Serve adds replicas as queues grow
    target_ongoing_requests: int = 32  # the queue length per replica that Ray Serve's autoscaler keeps (requests in flight or waiting)
    max_ongoing_requests: int = 256  # requests one replica accepts at once (more wait in the router's queue)
    view: Resources = resources_field()  # what each view replica asks Ray for (gpus: engine.tensor_parallel_size on GPU clusters)
    ingress: Resources = resources_field()  # what the router replica (HTTP, router features) asks Ray for
    ingress_replicas: int = 1  # replicas of the router and HTTP front
    app_name: str = "home"  # the Ray Serve application's name (`serve status` shows it)

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"ray.min_replicas ({self.min_replicas}) must be at least 1 and at most "
                              f"ray.max_replicas ({self.max_replicas})")
        if self.target_ongoing_requests < 1 or self.max_ongoing_requests < 1 or self.ingress_replicas < 1:
            raise ConfigError("ray.target_ongoing_requests, ray.max_ongoing_requests and ray.ingress_replicas "
                              "must be at least 1")


@dataclasses.dataclass
class ServeConfig:
    checkpoint: str = DEFAULT_ROUTER_OUTPUT + "/final"  # HOME checkpoint with a trained router (default: the router stage's final)
    output_dir: str = "outputs/serve"  # logs/, requests.jsonl (one line per request) and the exported views (views/)
    host: str = "127.0.0.1"  # address the HTTP server binds (0.0.0.0: every interface; an address other than loopback needs api_key or allow_unauthenticated=true)
    port: int = 8000  # HTTP port (0: any free port, printed at start-up)
    image_dir: str = ""  # image_url file paths (file:///... or relative) are read from under this folder only ("": refused, data URLs only)
    served_model_name: str = "home"  # the model id of /v1/models; requests naming another model get a 404
    backend: str = "local"  # local: one process, one vLLM engine per view | ray: Ray Serve, replicas per view scaled by queue length
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)  # how chat messages are rendered (as training rendered its prompts)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)  # the vLLM engine of each view
    router: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)  # the router's forward
    ray: RayServeConfig = dataclasses.field(default_factory=RayServeConfig)  # backend=ray: replicas and autoscaling
    log_every_s: float = 30.0  # a summary line (requests/s, thinking ratio, tokens and latency per expert) this often while requests come (0: off)
    api_key: str = ""  # clients must send "Authorization: Bearer KEY" on every /v1/* route ("": the HOME_RL_API_KEY environment variable, else no key); config.yaml does not keep it
    allow_unauthenticated: bool = False  # serve on a host other than loopback without an api_key (anyone who reaches the port may use it)

    CHOICES: ClassVar[dict] = {"backend": ("local", "ray")}

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if not self.served_model_name:
            raise ConfigError("served_model_name must not be empty")

    def resolve(self, given: frozenset[str] = frozenset()) -> "ServeConfig":
        """The host rule, and the lengths the user did not set fitted to the checkpoint's context
        (home_rl/context_length.py); `given`: the keys the user set."""
        if self.api_key == API_KEY_NOT_SAVED:  # a saved config.yaml: the key comes from the environment
            if not os.environ.get(API_KEY_ENV):
                raise ConfigError(f"api_key: config.yaml does not keep the server's key; give api_key=KEY or set "
                                  f"{API_KEY_ENV}")
            self.api_key = ""
        self.check_host()
        fit_lengths(self, ["engine.max_model_len"], model_context(self.checkpoint), given)
        fit_lengths(self, ["engine.max_tokens"], key_limit(self, "engine.max_model_len"), given)
        return self

    def client_key(self) -> str:
        """The key clients must send: api_key, else HOME_RL_API_KEY's ("": none). Read when the server starts
        rather than at load, so that --help and config.yaml do not show it."""
        return self.api_key or os.environ.get(API_KEY_ENV, "")

    def check_host(self) -> None:
        """An open port on other machines' reach needs a key, or the user's word that it may go without one."""
        if not self.client_key() and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ConfigError(f"host={self.host} serves other machines: set api_key=KEY (or {API_KEY_ENV}), or "
                              "allow_unauthenticated=true to serve them without one")

    def saved(self) -> "ServeConfig":
        """This config as config.yaml records it: the key stays out of files."""
        return dataclasses.replace(self, api_key=API_KEY_NOT_SAVED if self.client_key() else "")


API_KEY_ENV = "HOME_RL_API_KEY"
API_KEY_NOT_SAVED = "<not saved: give api_key or HOME_RL_API_KEY>"  # config.yaml's api_key when the server had one


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address to bind) is reached from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another name: it may resolve to any interface
        return False
