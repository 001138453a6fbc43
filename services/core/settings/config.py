"""Every setting of the fleet, declared once.

Services compose these groups: the replay server needs `EnvConfig` (its table
signature is derived from the environment, so no service waits for another to
start) and `ReplayConfig`; a collector needs `EnvConfig`, `NetworkConfig` and
`CollectorConfig`; the trainer needs `EnvConfig`, `NetworkConfig`,
`AgentConfig` and `TrainerConfig`. Defaults are the Nature-DQN ones for Atari;
`classic=` gives the default for classic-control ids (CartPole-v1, ...), whose
small MLP learns in minutes with far more updates per environment step.
"""

import dataclasses

from dqnfleet.core.settings.flags import ConfigError, setting

DEFAULT_REPLAY_PORT = 8000
DEFAULT_REPLAY_STATUS_PORT = 8001
DEFAULT_TRAINER_PORT = 8010
DEFAULT_COLLECTOR_STATUS_PORT = 8020
DEFAULT_EVALUATOR_STATUS_PORT = 8030
# The trainer's tf.data service dispatcher (off by default) and its input workers.
DEFAULT_INPUT_DISPATCHER_PORT = 8012
DEFAULT_INPUT_WORKER_PORT = 8040
DEFAULT_INPUT_WORKER_STATUS_PORT = 8041
# Prometheus scrapes each service on a port of its own (/metrics), next to
# the service's status port.
DEFAULT_REPLAY_METRICS_PORT = 8002
DEFAULT_TRAINER_METRICS_PORT = 8011
DEFAULT_COLLECTOR_METRICS_PORT = 8021
DEFAULT_EVALUATOR_METRICS_PORT = 8031
DEFAULT_INPUT_WORKER_METRICS_PORT = 8042
INPUT_IN_PROCESS = -1
# What the trainer may compute in (TrainerConfig.precision, core/rl/networks.resolve_precision).
PRECISIONS = ("auto", "fp32", "bf16")
METRICS_OFF = -1


def _metrics_port(default: int):
  return setting(
    default,
    "Port of the Prometheus /metrics endpoint (0: any free port, -1: off).",
    minimum=METRICS_OFF,
    maximum=65535,
  )


def _status_port(default: int):
  return setting(
    default, "Port of the health check and status RPC (0: any free port).", minimum=0, maximum=65535
  )


# Emulator frames per agent step in Atari (the Nature DQN frame skip).
ATARI_FRAME_SKIP = 4


def is_atari(env_id: str) -> bool:
  """Atari ids train from pixels; every other id is a classic-control one."""
  return env_id.startswith("ALE/")


def frames_per_agent_step(env_id: str) -> int:
  """What an agent step is worth in frames, the unit Atari results are given in."""
  return ATARI_FRAME_SKIP if is_atari(env_id) else 1


@dataclasses.dataclass
class CommonConfig:
  """Settings every service has."""

  log_level: str = setting(
    "INFO",
    "Log level of the service's own log lines.",
    choices=("DEBUG", "INFO", "WARNING", "ERROR"),
  )
  log_format: str = setting(
    "text",
    "Log line format: text for people, json for log pipelines "
    "(fields time, level, service, instance, logger, message).",
    choices=("text", "json"),
  )
  # Containers reach each other by their own addresses, so every interface
  # by default; `dqnfleet up` gives 127.0.0.1. Reverb's own port has no such
  # option (core/transport/security.py).
  listen_host: str = setting(
    "::",
    "Address the service's gRPC and metrics servers listen on: "
    ":: or 0.0.0.0 for every interface, 127.0.0.1 for this "
    "machine only.",
  )
  # One identity per service: the certificate its servers present is also the
  # one it shows as a client to servers that ask (mutual TLS).
  tls_cert: str = setting(
    "",
    "PEM certificate (chain) of this service; with --tls-key its gRPC "
    "servers speak TLS. Empty: plaintext.",
  )
  tls_key: str = setting("", "PEM private key of --tls-cert.")
  tls_client_ca: str = setting(
    "",
    "PEM CA certificate(s): this service's servers accept only "
    "clients with a certificate they signed (mutual TLS).",
  )
  tls_ca: str = setting(
    "",
    "PEM CA certificate(s) that signed the servers this process "
    "connects to (trainer, status); set it to connect with TLS.",
  )
  # A file, not a value: flags show in `ps` and values in `docker inspect`.
  auth_token_file: str = setting(
    "",
    "File holding a bearer token: servers require it on the "
    "status, policy and summary APIs (health stays open for "
    "probes), clients send it. Empty: no token.",
  )


@dataclasses.dataclass
class EnvConfig:
  """The environment; replay, collectors and trainer must agree on it."""

  env_id: str = setting(
    "ALE/Breakout-v5",
    "Gymnasium environment id: an Atari id (ALE/<Game>-v5), trained from pixels with the "
    "Nature CNN, or a classic-control id with discrete actions (CartPole-v1, Acrobot-v1, "
    "MountainCar-v0, ...), trained from its state vector with an MLP.",
  )
  # Consecutive observations share all but one frame, so replay stores each
  # frame once whatever the stack (core/rl/specs.py).
  frame_stack: int = setting(
    4, "Atari: most recent 84x84 grayscale frames per observation.", minimum=1, maximum=16
  )
  # Random no-ops de-correlate the starts of episodes (Nature DQN: up to 30).
  noop_max: int = setting(
    30, "Atari: at most this many no-op actions at each episode start.", minimum=0, maximum=1000
  )
  # Nature DQN's training signal: losing a life is the thing to avoid.
  terminal_on_life_loss: bool = setting(
    True,
    "Atari, training only: a lost life ends the value bootstrap (discount 0) without "
    "resetting the game; evaluation always plays whole games of all lives.",
  )
  # Off, as in Nature DQN: sticky actions make Breakout harder to learn (docs/breakout.md).
  sticky_actions: bool = setting(
    False,
    "Atari, training: sticky actions, the previous action repeated with probability "
    "0.25 per frame (Machado et al. 2018, Dopamine). Evaluation has its own, "
    "--eval-sticky-actions.",
  )
  # Part of the replay item layout, so replay, collectors and trainer agree
  # on it like on the environment (core/rl/specs.py).
  n_step: int = setting(
    3, "Transitions per n-step return target (1: one-step DQN).", minimum=1, maximum=32, classic=1
  )
  # Clipping keeps TD errors in the same range across games.
  clip_rewards: bool = setting(
    True,
    "Clip training rewards to [-1, 1] (Atari); episode returns are reported unclipped.",
    classic=False,
  )


@dataclasses.dataclass
class NetworkConfig:
  """The Q-network; collectors build the same one to load published weights."""

  fc_layers: tuple[int, ...] = setting(
    (512,),
    "Sizes of the fully connected hidden layers: "
    "after the Nature CNN for pixels, the whole "
    "network for state vectors.",
    minimum=1,
    classic=(256, 256),
  )


@dataclasses.dataclass
class AgentConfig:
  """The DQN learner's hyperparameters."""

  batch_size: int = setting(
    32, "Transitions per gradient step.", minimum=1, maximum=65536, classic=128
  )
  learning_rate: float = setting(
    1e-4, "Optimizer learning rate.", minimum=1e-9, maximum=1.0, classic=1e-3
  )
  optimizer: str = setting("adam", "Optimizer.", choices=("adam", "rmsprop"))
  # Keras' 1e-7 lets Adam take huge steps on weights with tiny gradients;
  # Dopamine and Rainbow use 1.5e-4 (0.01 / batch 32).
  adam_epsilon: float = setting(1.5e-4, "Adam's epsilon.", minimum=1e-12, maximum=1.0, classic=1e-7)
  gamma: float = setting(0.99, "Discount factor per agent step.", minimum=0.0, maximum=1.0)
  # Scoring the online net's next action with the target net curbs the
  # max-operator's overestimation.
  double_dqn: bool = setting(
    True, "Use Double DQN targets (the online net picks the next action, the target net scores it)."
  )
  # 500 updates = 2,000 agent steps at 8 samples per insert, a quarter of
  # Dopamine's 8k: in an hour of 2 cores (~130k updates) Breakout learned
  # faster with it (docs/breakout.md). The MLP tolerates still more frequent copies.
  target_update_period: int = setting(
    500, "Update the target net every N train steps.", minimum=1, classic=100
  )
  target_update_tau: float = setting(
    1.0,
    "Fraction of the way the target net moves per update "
    "(1: a copy of the online net, as in Nature DQN; less: "
    "Polyak averaging).",
    minimum=0.0001,
    maximum=1.0,
  )
  td_loss: str = setting("huber", "Loss on the TD error.", choices=("huber", "squared"))
  # Huber loss is linear beyond a TD error of 1. With values near 100
  # (CartPole: +1 per step, gamma 0.99) the rare terminal transitions then
  # pull no harder than any other, and the greedy policy stalls at ~100 steps
  # with the cart drifting off the track. Scaling rewards by 0.01 keeps TD
  # errors inside Huber's quadratic zone; measured in docs/performance.md.
  reward_scale: float = setting(
    1.0,
    "Multiply training rewards by this (Q-values scale with it; episode returns are "
    "reported unscaled).",
    minimum=1e-6,
    maximum=1e6,
    classic=0.01,
  )
  importance_exponent: float = setting(
    0.5,
    "Prioritized replay (replay's --prioritized): the exponent of the importance "
    "weights (N * P(i))^-exponent, normalised by their batch maximum, that undo its "
    "sampling bias in the loss (0: no correction, 1: full; uniform replay: every "
    "weight is 1).",
    minimum=0.0,
    maximum=1.0,
  )
  # Gradient norm clipping guards the first updates against huge TD errors.
  gradient_clipping: float = setting(10.0, "Clip gradient norm to this (0 disables).", minimum=0.0)


@dataclasses.dataclass
class ReplayConfig:
  """The Reverb server and its replay table."""

  port: int = setting(DEFAULT_REPLAY_PORT, "Reverb gRPC port.", minimum=0, maximum=65535)
  # Reverb's own server has no health service, so health and status live on
  # a second port in the same process.
  status_port: int = setting(
    DEFAULT_REPLAY_STATUS_PORT, "Port of the health check and status RPC.", minimum=0, maximum=65535
  )
  metrics_port: int = _metrics_port(DEFAULT_REPLAY_METRICS_PORT)
  max_size: int = setting(
    1_000_000,
    "Maximum transitions in the table (FIFO removal).",
    minimum=1,
    maximum=2**31 - 1,
    classic=100_000,
  )
  min_size: int = setting(
    20_000, "Transitions in the table before the trainer may sample.", minimum=1, classic=1_000
  )
  # Samples are counted in transitions: with batch 32 and ratio 8, one train
  # step per 4 environment steps (Nature DQN); CartPole (batch 128, ratio 64)
  # takes one per 2 environment steps.
  samples_per_insert: float = setting(
    8.0, "Target ratio of sampled to inserted transitions.", minimum=0.001, classic=64.0
  )
  rate_limit_tolerance: float = setting(
    0.1,
    "Allowed drift of the ratio before the rate limiter "
    "blocks the faster side, as a fraction of "
    "min_size * samples_per_insert.",
    minimum=0.0,
    maximum=100.0,
  )
  # New items enter with priority 1.0, of the order of clipped-reward TD
  # errors, so they are sampled soon.
  prioritized: bool = setting(
    False, "Sample by priority (|TD error|, set by the trainer) instead of uniformly."
  )
  priority_exponent: float = setting(
    0.6,
    "Prioritized replay: exponent alpha of the priorities (sampling probability ~ priority^alpha).",
    minimum=0.0,
    maximum=1.0,
  )
  checkpoint_dir: str = setting(
    "",
    "Directory for table checkpoints; the newest one is restored at start. Empty: no checkpoints.",
  )
  # A crash (kill -9, OOM, a lost node) loses what came since the last
  # checkpoint, about a minute (85 s at most with a full table). A full
  # 1M-item Breakout table takes about 13 s and 10 CPU seconds to checkpoint
  # and stalls inserts and samples for up to 2.5 s: 3-4 % of sampling on 2
  # cores at this interval (docs/replay.md).
  checkpoint_every_s: float = setting(
    60.0, "Seconds between checkpoints (0: only at shutdown).", minimum=0.0
  )

  def validate(self) -> None:
    if self.min_size > self.max_size:
      raise ConfigError(f"--min-size ({self.min_size}) must be <= --max-size ({self.max_size})")
    ports = {
      "--port": self.port,
      "--status-port": self.status_port,
      "--metrics-port": self.metrics_port,
    }
    check_distinct_ports(ports)

  def error_buffer(self) -> float:
    """The SampleToInsertRatio error buffer implied by the tolerance.

    Reverb refuses buffers under max(1, samples_per_insert), which would
    deadlock sampler and inserters against each other.
    """
    return max(
      self.min_size * self.samples_per_insert * self.rate_limit_tolerance,
      2.0 * max(1.0, self.samples_per_insert),
    )


@dataclasses.dataclass
class CollectorConfig:
  """A collector: batched environments, epsilon-greedy policy, Reverb writers."""

  replay_addresses: tuple[str, ...] = setting(
    (f"localhost:{DEFAULT_REPLAY_PORT}",),
    "Reverb servers (replay shards), host:port[,host:port...]: each environment writes "
    "its episodes to one of them, so the collector's writes spread over all.",
    address=True,
  )
  trainer_address: str = setting(
    f"localhost:{DEFAULT_TRAINER_PORT}", "Trainer's policy API host:port.", address=True
  )
  num_envs: int = setting(
    8, "Environments stepped together; one policy call per step for all.", minimum=1, maximum=1024
  )
  collector_id: str = setting(
    "",
    "Unique id of this collector (default: hostname-pid; in a "
    "cluster the host name is the pod's or container's).",
  )
  # Derived by default, so that replicas differ without edits. `dqnfleet up`
  # sets it from its own --seed (UpConfig.seed).
  seed: int = setting(-1, "Random seed (-1: derived from the collector id).", minimum=-1)
  # Ape-X (Horgan et al. 2018): actors that explore at different rates give
  # replay both near-greedy play and wide exploration, however long the run.
  exploration: str = setting(
    "decay",
    "Exploration schedule: decay (every environment follows one linear decay over the "
    "fleet's steps, --epsilon-start to --epsilon-end) or ladder (each episode draws its "
    "epsilon from the Ape-X ladder base^(1 + alpha * i / (rungs - 1)), i = 0..rungs-1).",
    choices=("decay", "ladder"),
  )
  # A draw per episode, as in Acme, needs no fleet size: collectors may come
  # and go and the fleet's epsilons still follow the ladder.
  ladder_rungs: int = setting(
    16, "Ladder: number of epsilons on the ladder.", minimum=2, maximum=4096
  )
  ladder_base: float = setting(
    0.4, "Ladder: epsilon of the most exploring rung (Ape-X: 0.4).", minimum=1e-6, maximum=1.0
  )
  ladder_alpha: float = setting(
    7.0,
    "Ladder: how far the rungs reach, the least exploring being base^(1 + alpha) "
    "(Ape-X: 7, 0.4^8 = 0.00066).",
    minimum=0.0,
    maximum=100.0,
  )
  epsilon_start: float = setting(
    1.0,
    "Exploration rate before any training (both schedules: until the first trained policy).",
    minimum=0.0,
    maximum=1.0,
  )
  epsilon_end: float = setting(
    0.01, "Exploration rate after the decay.", minimum=0.0, maximum=1.0, classic=0.02
  )
  # The fleet's agent steps (replay's insert count) are the same clock for
  # every collector however many there are. Nature DQN and Dopamine: 1 M
  # frames = 250k agent steps at frame skip 4.
  epsilon_decay_steps: int = setting(
    250_000,
    "Agent steps of the whole fleet over which epsilon "
    "decays linearly (every collector acts at random "
    "until the first policy).",
    minimum=1,
    classic=8_000,
  )
  status_port: int = _status_port(DEFAULT_COLLECTOR_STATUS_PORT)
  metrics_port: int = _metrics_port(DEFAULT_COLLECTOR_METRICS_PORT)
  max_env_steps: int = setting(
    0, "Stop after this many environment steps (0: run until stopped).", minimum=0
  )

  def validate(self) -> None:
    if self.epsilon_end > self.epsilon_start:
      raise ConfigError(
        f"--epsilon-end ({self.epsilon_end}) must be <= --epsilon-start ({self.epsilon_start})"
      )


@dataclasses.dataclass
class TrainerConfig:
  """The trainer: sampling, training, checkpoints and policy publication."""

  replay_addresses: tuple[str, ...] = setting(
    (f"localhost:{DEFAULT_REPLAY_PORT}",),
    "Reverb servers (replay shards), host:port[,host:port...]: the trainer samples every "
    "shard in proportion to its size and keeps training from the others when one is lost.",
    address=True,
  )
  port: int = setting(
    DEFAULT_TRAINER_PORT,
    "Port of the policy API, status RPC and health check.",
    minimum=0,
    maximum=65535,
  )
  metrics_port: int = _metrics_port(DEFAULT_TRAINER_METRICS_PORT)
  run_dir: str = setting(
    "runs/trainer", "Directory for checkpoints, policies/ and TensorBoard logs."
  )
  publish_every: int = setting(
    1000,
    "Publish the policy every N train steps (its version is the "
    "train step; collectors load each one).",
    minimum=1,
    classic=100,
  )
  keep_policies: int = setting(5, "Published versions kept on disk.", minimum=1)
  checkpoint_every: int = setting(
    10_000, "Write a training checkpoint every N train steps.", minimum=1, classic=2_000
  )
  max_train_steps: int = setting(
    0, "Stop after this many train steps (0: run until stopped).", minimum=0
  )
  # A supervisor that restarts whatever exits (a Kubernetes StatefulSet)
  # would otherwise restart a finished trainer forever.
  serve_after_max_steps: bool = setting(
    False,
    "After --max-train-steps, keep serving the final policy and status until stopped "
    "instead of exiting.",
  )
  # Sampling ahead overlaps replay's gRPC with the train step's compute.
  prefetch_batches: int = setting(4, "Batches prefetched from replay.", minimum=1, maximum=1024)
  # Each worker is a gRPC stream and the thread that decompresses what it
  # receives: more of them feed a learner faster than one core can
  # (docs/scale.md), at the price of the cores they take.
  sampling_workers: int = setting(
    1, "Reverb sampling workers per replay shard.", minimum=1, maximum=64
  )
  # When the trainer's host has too few cores for its input (docs/scale.md):
  # tf.data service workers on other hosts sample and batch, the trainer only
  # receives batches (42-44 CPU-us per item against 203, docs/performance.md).
  input_dispatcher_port: int = setting(
    INPUT_IN_PROCESS,
    "Port of a tf.data service dispatcher in the trainer: `dqnfleet input-worker`s that "
    "register there sample replay and build the batches, and the trainer trains on what "
    "they stream (-1: off, the trainer samples in its own process).",
    minimum=INPUT_IN_PROCESS,
    maximum=65535,
  )
  log_every_s: float = setting(10.0, "Seconds between progress log lines.", minimum=0.1)
  # bf16 trains the same float32 weights faster only where the CPU has the
  # instructions; elsewhere TensorFlow emulates it, 6x slower (docs/performance.md).
  precision: str = setting(
    "auto",
    "What the trainer computes in: bf16 (float32 weights, bfloat16 products) or fp32; "
    "auto is bf16 for the Atari network on CPUs with AVX-512 BF16 or AMX and oneDNN, "
    "fp32 elsewhere.",
    choices=PRECISIONS,
  )

  def validate(self) -> None:
    check_distinct_ports(
      {
        "--port": self.port,
        "--metrics-port": self.metrics_port,
        "--input-dispatcher-port": self.input_dispatcher_port,
      }
    )


@dataclasses.dataclass
class InputWorkerConfig:
  """An input worker: runs the trainer's sampling pipeline on a host of its own."""

  dispatcher_address: str = setting(
    f"localhost:{DEFAULT_INPUT_DISPATCHER_PORT}",
    "The trainer's tf.data service dispatcher, host:port (its --input-dispatcher-port).",
    address=True,
  )
  port: int = setting(
    DEFAULT_INPUT_WORKER_PORT,
    "Port the trainer fetches batches from (tf.data service worker).",
    minimum=0,
    maximum=65535,
  )
  # The dispatcher hands this address to the trainer, which connects to it.
  worker_address: str = setting(
    "",
    "host:port the trainer reaches this worker at (empty: this host's address on the "
    "route to the dispatcher, and --port).",
  )
  status_port: int = _status_port(DEFAULT_INPUT_WORKER_STATUS_PORT)
  metrics_port: int = _metrics_port(DEFAULT_INPUT_WORKER_METRICS_PORT)

  def validate(self) -> None:
    check_distinct_ports(
      {"--port": self.port, "--status-port": self.status_port, "--metrics-port": self.metrics_port}
    )


@dataclasses.dataclass
class UpConfig:
  """The local launcher: the whole fleet as processes on this machine."""

  collectors: int = setting(2, "Collector processes to start.", minimum=1, maximum=64)
  # Each shard is a whole replay server with the replay settings (--max-size,
  # --min-size, ... are per shard), its own port range and checkpoint directory.
  replay_shards: int = setting(
    1, "Replay servers (shards) to start; collectors and trainer use all.", minimum=1, maximum=16
  )
  run_dir: str = setting(
    "runs/latest",
    "Directory for checkpoints, policies/, logs/ and TensorBoard summaries of this run.",
  )
  progress_every_s: float = setting(5.0, "Seconds between progress lines.", minimum=0.5)
  # One name with CollectorConfig.seed on purpose: both are the collectors'
  # seed. `up` sets each collector's from this one, so under `up` --seed,
  # DQNFLEET_SEED and a config file's `seed` mean the fleet's.
  seed: int = setting(
    0,
    "Seed of the collectors' environments and exploration: collector i "
    "gets 1000 * seed + i (the networks' initial weights are not seeded, "
    "so two runs differ even with one seed).",
    minimum=0,
    maximum=2**20,
  )
  # Measured to cost the trainer little on 2 cores (docs/breakout.md).
  evaluator: bool = setting(
    True, "Also run the evaluator (history and GIF in <run-dir>/eval).", classic=False
  )


@dataclasses.dataclass
class ProtocolConfig:
  """How a policy is evaluated; `evaluate`, the evaluator and `up` share it."""

  # eval_* where training has a setting of the same name (sticky_actions,
  # num_envs, seed): `up` reads both, and one flag, DQNFLEET_* variable or
  # config-file key must not set the two.
  # Nature DQN (Mnih et al. 2015): epsilon 0.05 keeps an agent from stalling
  # where the greedy action does nothing (never pressing FIRE in Breakout).
  epsilon: float = setting(
    0.05,
    "Probability of a random action during evaluation (Nature DQN: 0.05, Dopamine: 0.001).",
    minimum=0.0,
    maximum=1.0,
  )
  episodes: int = setting(
    10,
    "Episodes per evaluation; Atari episodes are whole games of all "
    "lives, capped at 108,000 frames.",
    minimum=1,
    maximum=100_000,
  )
  eval_sticky_actions: bool = setting(
    False,
    "Atari: sticky actions (repeat probability 0.25) during evaluation; off is the "
    "Nature DQN protocol, on Machado et al. 2018's and Dopamine's. Training's are "
    "--sticky-actions.",
  )
  eval_num_envs: int = setting(10, "Evaluation environments run at once.", minimum=1, maximum=256)
  eval_seed: int = setting(12345, "Seed of the evaluation environments.", minimum=0)


@dataclasses.dataclass
class EvaluateConfig:
  """`dqnfleet evaluate`: one evaluation of a published policy."""

  policy: str = setting(
    "",
    "A policies directory (its newest version is used), one version's "
    "directory, a run directory, or a trainer's host:port.",
  )
  video: str = setting(
    "", "Write the best evaluated episode, as the agent sees it, to this animated GIF (.gif)."
  )
  json: bool = setting(False, "Print one JSON object (mean_return, episodes, returns, ...).")

  def validate(self) -> None:
    if not self.policy:
      raise ConfigError("--policy is required: a policies directory or a trainer's host:port")
    validate_video(self.video, "--video")


@dataclasses.dataclass
class ExportConfig:
  """`dqnfleet export`: a published policy as a TensorFlow SavedModel."""

  policy: str = setting(
    "",
    "A policies directory (its newest version is used), one version's "
    "directory, a run directory, or a trainer's host:port.",
  )
  out: str = setting("", "Directory to write the SavedModel to (must not exist or be empty).")

  def validate(self) -> None:
    if not self.policy:
      raise ConfigError("--policy is required: a policies directory or a trainer's host:port")
    if not self.out:
      raise ConfigError("--out is required: the directory to write the SavedModel to")


@dataclasses.dataclass
class EvaluatorConfig:
  """The evaluator service: evaluates new policy versions while the fleet trains."""

  trainer_address: str = setting(
    f"localhost:{DEFAULT_TRAINER_PORT}", "Trainer's policy API host:port.", address=True
  )
  every_minutes: float = setting(
    5.0,
    "Evaluate the newest version every M minutes (0: never by "
    "time; with --every-versions, whichever comes first).",
    minimum=0.0,
    maximum=10_000.0,
  )
  every_versions: int = setting(
    0, "Evaluate the newest version every N new versions (0: never by count).", minimum=0
  )
  out_dir: str = setting(
    "runs/evaluator", "Directory for history.jsonl, history.csv and best_episode.gif."
  )
  status_port: int = _status_port(DEFAULT_EVALUATOR_STATUS_PORT)
  metrics_port: int = _metrics_port(DEFAULT_EVALUATOR_METRICS_PORT)
  # One thread keeps the evaluator off the trainer's cores (docs/breakout.md).
  threads: int = setting(
    1, "CPU threads for the environments and the Q-network.", minimum=1, maximum=256
  )

  def validate(self) -> None:
    if not self.every_minutes and not self.every_versions:
      raise ConfigError(
        "--every-minutes and --every-versions are both 0: the evaluator would "
        "never evaluate; set one of them"
      )


def check_distinct_ports(ports: dict[str, int]) -> None:
  """Refuses two of one service's ports set to the same number (0 and -1 excepted)."""
  seen = {}
  for flag, port in ports.items():
    if port > 0 and port in seen:
      raise ConfigError(f"{seen[port]} and {flag} must differ, both are {port}")
    seen[port] = flag


def validate_video(path: str, flag: str) -> None:
  if path and not path.lower().endswith(".gif"):
    raise ConfigError(f"{flag} {path!r}: only animated GIFs are written; use a path ending in .gif")
