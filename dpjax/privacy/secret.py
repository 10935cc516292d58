"""The run's secret: the randomness the (ε, δ) guarantee depends on.

DP-SGD's guarantee holds only if the adversary cannot know the noise or which
examples were sampled. Both are therefore derived from one 256-bit secret drawn
from the operating system's entropy (``os.urandom``) when a run starts, kept in
the run's checkpoints (which are secret) and nowhere else: not in configs,
summaries, metrics, logs or exported models.

Keys for each purpose (noise, sampling, fingerprints) are HMAC-SHA256 of the
secret with the purpose's name and its numbers (e.g. the attempt), so they are
independent of each other and none reveals the secret.

``RunSecret.insecure_fixed(seed)`` derives the secret from a public integer,
for tests and debugging only: with it the released model is a deterministic
function of the config and the data, and a run carries no guarantee.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os

import numpy as np

SECRET_BYTES = 32


@dataclasses.dataclass(frozen=True, repr=False)
class RunSecret:
  """256 secret bits and the keys derived from them.

  Attributes:
    value: the 32 secret bytes.
    fixed_seed: None for a secret from OS entropy; the public seed for an
      insecure fixed secret (no privacy guarantee).
  """

  value: bytes
  fixed_seed: int | None = None

  def __post_init__(self):
    if not isinstance(self.value, bytes) or len(self.value) != SECRET_BYTES:
      raise ValueError(f"a run secret is {SECRET_BYTES} bytes")

  @classmethod
  def fresh(cls) -> RunSecret:
    """A new secret from the operating system's entropy (256 bits)."""
    return cls(os.urandom(SECRET_BYTES))

  @classmethod
  def insecure_fixed(cls, seed: int) -> RunSecret:
    """A secret that is a public function of ``seed``: reproducible, and NOT private."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
      raise ValueError(f"the fixed noise seed must be an integer >= 0 (got {seed!r})")
    value = hashlib.sha256(b"dpjax insecure fixed noise seed:" + str(seed).encode()).digest()
    return cls(value, fixed_seed=seed)

  @property
  def secure(self) -> bool:
    """True if the secret came from OS entropy (the guarantee can hold)."""
    return self.fixed_seed is None

  def derive(self, purpose: str, *numbers: int) -> bytes:
    """32 bytes: HMAC-SHA256(secret, purpose, numbers), a key for one purpose."""
    message = ":".join([purpose, *(str(int(n)) for n in numbers)]).encode()
    return hmac.new(self.value, message, hashlib.sha256).digest()

  def noise_key(self, attempt: int = 0) -> np.ndarray:
    """The ChaCha20 noise key (uint32[8]) of an attempt (see the privacy journal)."""
    return np.frombuffer(self.derive("noise", attempt), dtype="<u4").astype(np.uint32)

  def sampling_key(self, attempt: int = 0) -> bytes:
    """The key of the Poisson sampler of an attempt."""
    return self.derive("sampling", attempt)

  def to_checkpoint(self) -> dict:
    """The JSON form stored in checkpoint metadata (and only there)."""
    return {"value": self.value.hex(), "fixed_seed": self.fixed_seed}

  @classmethod
  def from_checkpoint(cls, data: dict) -> RunSecret:
    try:
      return cls(bytes.fromhex(data["value"]), data.get("fixed_seed"))
    except (KeyError, TypeError, ValueError):
      raise ValueError("the checkpoint's run secret is missing or malformed") from None

  def __repr__(self) -> str:
    kind = "from OS entropy" if self.secure else f"INSECURE fixed seed {self.fixed_seed}"
    return f"RunSecret({kind})"
