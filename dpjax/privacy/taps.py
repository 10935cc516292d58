"""The tap schema: what a model's layers report to the book-keeping backend, by name.

Models (:mod:`dpjax.models.layers`, the output bias of :mod:`dpjax.models.bert`)
write these names; :mod:`dpjax.privacy.bookkeeping` reads them. Both import
them from here, so the protocol between the two is written down once.

A tapped layer does two things in its forward pass:

* ``module.sow(TAPS, name, value)``: a value the weight gradient needs (the
  layer's input, the looked-up ids, ...), one entry per use of the layer.
* ``perturb_output(module, name, y)``: adds a zero from the ``PERTURBATIONS``
  collection to an output, so the gradient w.r.t. that zero is ∂L/∂y.

Each layer kind is identified by its *marker* (a tap or output that no other
kind has) and has a gradient rule in :data:`dpjax.privacy.bookkeeping.LAYER_KINDS`.
Adding a kind: a marker here, the layer that writes it, one registry entry, and
a test that the backend equals vmap on a model that uses it.
"""

from __future__ import annotations

# Flax collections.
TAPS = "taps"  #: forward values, written with ``sow``
PERTURBATIONS = "perturbations"  #: zero output perturbations; their gradients are ∂L/∂y

# Dense: y = x W + b (+ LoRA: s · x A B).
DENSE_INPUT = "in"  #: x [..., d_in]; marker of a Dense layer
LORA_SCALE = "lora_scale"  #: s = α / r, when the layer has adapters
OUTPUT = "out"  #: y, the perturbed output (Dense, Embed lookup, LayerNorm)

# Embed: a lookup table [V, H], used for lookups and/or as a tied output layer.
EMBED_IDS = "ids"  #: looked-up row ids; marker of a lookup
ATTEND_INPUT = "attend_in"  #: x [..., H] of the tied output layer x Eᵀ; marker of that use
ATTEND_ROWS = "attend_rows"  #: the rows k of E the output layer is restricted to, if any
ATTEND_OUTPUT = "attend_out"  #: the output logits of the tied layer (perturbed)

# LayerNorm: y = x̂ ⊙ scale + bias.
NORMALIZED = "normalized"  #: x̂; marker of a LayerNorm

# The output bias of a (possibly tied) decoder: logits = h Eᵀ + bias.
LOGITS = "logits"  #: the logits (perturbed); marker of an output bias
BIAS_ROWS = "bias_rows"  #: the vocabulary rows the bias is restricted to, if any
