"""The data layer: example sources, tokenization to fixed-shape arrays, and caching.

Sources (``TextFileSource``, ``TfdsSource``, ``sst2``) give random access to ``Example`` records;
``TfdsSpec`` parses the ``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` form a run names a TFDS split by.
``encode`` tokenizes a source once (optionally through a ``PromptTemplate``) into an
``EncodedDataset`` whose ``batch(indices)`` returns padded int32 arrays of a few bucketed shapes.
"""

from __future__ import annotations

from dpjax.data.base import DataError, Example, LabelRangeError, Source
from dpjax.data.encoded import EncodedDataset, encode, resolve_buckets
from dpjax.data.sources import (
  ExampleList,
  TextFileSource,
  TfdsSource,
  has_field,
  sst2,
  sst2_dir,
)
from dpjax.data.templates import PromptTemplate
from dpjax.data.tfds_source import TfdsSpec
from dpjax.data.tokenizer_utils import mask_token, pad_id

__all__ = [
  "DataError",
  "EncodedDataset",
  "Example",
  "ExampleList",
  "LabelRangeError",
  "PromptTemplate",
  "Source",
  "TextFileSource",
  "TfdsSource",
  "TfdsSpec",
  "encode",
  "has_field",
  "mask_token",
  "pad_id",
  "resolve_buckets",
  "sst2",
  "sst2_dir",
]
