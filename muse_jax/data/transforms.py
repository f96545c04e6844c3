"""Per-example decoding: bytes to an RGB crop and a caption, and every way that can go wrong.

(`PreencodedTransform`, at the end, does the same for pre-encoded records.)

Web-scale image-text data is dirty, and no broken file may stop a pod job (issue 6). Each
example goes through `ImageTransform`, which returns either the example or a skip marker,
together with the events it met; the batcher sums the events per batch, so counts survive
worker processes, and the iterator keeps running totals for the log and TensorBoard.

What happens to each kind of bad data:
- converted, and counted under `converted/<reason>`: grayscale, alpha (composited on
  white), CMYK, palette, 16-bit and other modes (to 8-bit RGB); images smaller than the crop
  but at least `min_image_fraction` of it (upscaled); captions that are not UTF-8 (decoded
  as Windows-1252, else with replacement characters).
- skipped, and counted under `skipped/<reason>`: unreadable files, non-images, truncated or
  corrupt images, images over `max_image_pixels`, images too small to upscale, missing
  images or captions, empty captions, malformed records.

The crop follows Muse (§4.1, random crops at training): resize the shorter side to the
resolution and cut a square, centred or at a random offset drawn from the example's own
generator (so a resumed job crops the same way). JPEGs are decoded at the smallest DCT
scale that still covers the crop (`Image.draft`), which makes large photos several times
cheaper.
"""

from collections.abc import Sequence
import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from muse_jax.data import records

SKIP_REASONS = (
  "read_error",  # the file or record could not be read (after retries)
  "missing_image",  # no image for this example (file absent, no image member in the shard)
  "not_an_image",  # the bytes are no image format Pillow knows
  "truncated_image",  # the image data ends early
  "corrupt_image",  # the image data is broken
  "image_too_large",  # more pixels than max_image_pixels (a decompression bomb)
  "image_too_small",  # shorter side below min_image_fraction of the resolution
  "missing_caption",  # no caption for this example
  "empty_caption",  # the caption is empty or only whitespace
  "bad_record",  # a malformed captions row, tar member or pre-encoded record
  "unexpected_error",  # any other failure while decoding (logged with the example's key)
  "bad_shard",  # a tar shard that is no tar file or ends early (once per shard, at start-up)
)
CONVERSIONS = (
  "grayscale",  # L or 1 to RGB
  "alpha",  # composited on white
  "cmyk",  # CMYK to RGB
  "palette",  # P to RGB
  "high_bit_depth",  # 16-bit or float pixels scaled to 8 bits
  "other_mode",  # YCbCr, LAB, HSV to RGB
  "upscaled",  # shorter side below the resolution
  "caption_not_utf8",  # decoded as Windows-1252 or with replacement characters
)
EVENTS = tuple(f"skipped/{r}" for r in SKIP_REASONS) + tuple(f"converted/{c}" for c in CONVERSIONS)
EVENT_INDEX = {name: i for i, name in enumerate(EVENTS)}

SKIP = "_skip"  # key of a skipped example's marker: the event index of its reason
EVENTS_KEY = "_events"  # key of the list of event indices (examples), count vector (batches)


def skipped(reason: str, events: Sequence[int] = ()) -> dict:
  """The marker a transform returns instead of an example."""
  index = EVENT_INDEX[f"skipped/{reason}"]
  return {SKIP: index, EVENTS_KEY: [*events, index]}


def _event(name: str) -> int:
  return EVENT_INDEX[f"converted/{name}"]


# ----------------------------------------------------------------------------- captions


def decode_caption(raw, rng: np.random.Generator) -> tuple[str | None, list[int]]:
  """Text from a caption field; one of several at random when given a list.

  Args:
    raw: bytes, str, a list / array of them (e.g. COCO's five captions), or None.
    rng: the example's generator, to choose among several captions.

  Returns:
    (the caption with whitespace normalised, or None when missing; conversion events).
  """
  if isinstance(raw, (list, tuple, np.ndarray)):
    options = [c for c in np.asarray(raw, dtype=object).reshape(-1) if c is not None and len(c)]
    if not options:
      return None, []
    raw = options[int(rng.integers(len(options)))]
  if raw is None:
    return None, []
  events = []
  if isinstance(raw, str):
    try:
      raw.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes stand for bytes that were not UTF-8
      raw = raw.encode("utf-8", "surrogateescape")
  if isinstance(raw, (bytes, np.bytes_)):
    raw = bytes(raw)
    try:
      raw = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
      events.append(_event("caption_not_utf8"))
      try:  # the usual culprit in web dumps: Windows-1252 text
        raw = raw.decode("cp1252")
      except UnicodeDecodeError:
        raw = raw.decode("utf-8", "replace")
  text = " ".join(str(raw).replace("\x00", " ").split())
  return text, events


# ----------------------------------------------------------------------------- images


def _to_rgb(image: Image.Image, events: list[int]) -> Image.Image:
  """Converts any Pillow mode to 8-bit RGB, recording what it did."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    events.append(_event("high_bit_depth"))
    pixels = np.asarray(image, np.float64)
    top = pixels.max(initial=0.0)
    scale = 255.0 if top <= 1.0 and mode == "F" else (255.0 / 65535.0 if top > 255 else 1.0)
    image = Image.fromarray(np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8), "L")
    mode = "L"
  if mode == "P":
    events.append(_event("palette"))
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    mode = image.mode
  if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
    events.append(_event("alpha"))
    if mode in ("LA", "La"):
      events.append(_event("grayscale"))
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    white.alpha_composite(image.convert("RGBA"))
    return white.convert("RGB")
  if mode in ("L", "1"):
    events.append(_event("grayscale"))
  elif mode == "CMYK":
    events.append(_event("cmyk"))
  elif mode != "RGB":
    events.append(_event("other_mode"))
  return image.convert("RGB")


def _open(data: bytes, resolution: int, max_pixels: int) -> Image.Image | str:
  """Decodes image bytes, or returns the skip reason."""
  try:
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
      return "image_too_large"
    if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
      # Decode at the smallest DCT scale whose shorter side still covers the crop.
      image.draft(image.mode, (resolution, resolution))
    image.load()
  except UnidentifiedImageError:
    return "not_an_image"
  except Image.DecompressionBombError:  # Pillow's own limit, 2 x Image.MAX_IMAGE_PIXELS
    return "image_too_large"
  except OSError as e:
    return "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
  except Exception:  # any decoder failure is a corrupt image, never a crash
    return "corrupt_image"
  try:
    image = ImageOps.exif_transpose(image)  # photos taken sideways
  except Exception:  # a broken EXIF block does not spoil the pixels
    pass
  return image


def _from_array(pixels: np.ndarray, events: list[int]) -> Image.Image | str:
  """An image from decoded pixels (TFDS, the shapes set): [H, W], [H, W, 1|3|4]."""
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
    return "corrupt_image"
  if pixels.dtype != np.uint8:
    events.append(_event("high_bit_depth"))
    top = 1.0 if np.issubdtype(pixels.dtype, np.floating) else float(np.iinfo(pixels.dtype).max)
    pixels = np.clip(np.round(pixels.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
  mode = "L" if pixels.ndim == 2 else ("RGB" if pixels.shape[-1] == 3 else "RGBA")
  return Image.fromarray(pixels, mode)


def crop_box(
  width: int, height: int, crop: str, rng: np.random.Generator
) -> tuple[float, float, float, float]:
  """The square (left, top, right, bottom) to cut: centred, or at a random offset."""
  side = min(width, height)
  if crop == "center":
    left, top = (width - side) / 2, (height - side) / 2
  else:
    left, top = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
  return (float(left), float(top), float(left + side), float(top + side))


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Raw record -> {"image", "caption", "key"}, or a skip marker; both carry events.

  A raw record (what sources return) is a dict with "key" and any of: "image" (encoded
  bytes or a pixel array), "caption" (bytes, str or a list of them), "error" (a skip
  reason found while reading), "events" (conversion names found while reading).
  """

  resolution: int = 256  # side of the square crop
  crop: str = "random"  # "random" or "center"
  min_image_fraction: float = 0.5  # smaller shorter sides are skipped, larger ones upscaled
  max_image_pixels: int = 178_956_970  # larger is skipped (Pillow refuses more than this anyway)
  output: str = "float32"  # "float32" in [-1, 1] or "uint8" in [0, 255]
  allow_empty_captions: bool = False  # keep examples with empty captions (unconditional data)

  def __post_init__(self):
    if self.crop not in ("random", "center"):
      raise ValueError(f"crop {self.crop!r} is not 'random' or 'center'")
    if self.output not in ("float32", "uint8"):
      raise ValueError(f"output {self.output!r} is not 'float32' or 'uint8'")

  def decode(self, raw: dict, rng: np.random.Generator) -> tuple[Image.Image | None, list, str]:
    """Decodes a record's image to RGB: (image or None, events, skip reason or "")."""
    events = [_event(name) for name in raw.get("events", ())]
    if raw.get("error"):
      return None, events, raw["error"]
    data = raw.get("image")
    if data is None or (isinstance(data, (bytes, np.bytes_)) and len(data) == 0):
      return None, events, "missing_image"
    if isinstance(data, np.ndarray) and data.dtype != object:
      image = _from_array(data, events)
    else:
      image = _open(bytes(data), self.resolution, self.max_image_pixels)
    if isinstance(image, str):
      return None, events, image
    return _to_rgb(image, events), events, ""

  def crop_resize(
    self, image: Image.Image, rng: np.random.Generator, events: list[int], resolution: int
  ) -> np.ndarray | None:
    """uint8 [R, R, 3] crop, or None when the image is too small to upscale."""
    short = min(image.size)
    if short < self.min_image_fraction * resolution:
      return None
    if short < resolution:
      events.append(_event("upscaled"))
    if image.size == (resolution, resolution):
      return np.asarray(image)
    box = crop_box(*image.size, self.crop, rng)
    # reducing_gap: a cheap integer reduce first when shrinking a lot, then a bicubic resize.
    out = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box, reducing_gap=3.0)
    return np.asarray(out)

  def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
    caption, caption_events = decode_caption(raw.get("caption"), rng)
    image, events, reason = self.decode(raw, rng)
    events += caption_events
    if reason:
      return skipped(reason, events)
    if caption is None:
      return skipped("missing_caption", events)
    if not caption and not self.allow_empty_captions:
      return skipped("empty_caption", events)
    pixels = self.crop_resize(image, rng, events, self.resolution)
    if pixels is None:
      return skipped("image_too_small", events)
    if self.output == "float32":
      pixels = pixels.astype(np.float32) / 127.5 - 1.0
    return {"image": pixels, "caption": caption, "key": str(raw.get("key", "")), EVENTS_KEY: events}


# ----------------------------------------------------------------------------- pre-encoded


@dataclasses.dataclass(frozen=True)
class PreencodedTransform:
  """Unpacks a pre-encoded record; pads its text to `text_length`."""

  text_length: int  # T
  features: tuple[str, ...] = ()  # ids features to keep ("ids_256", ...); () = all

  def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
    del rng  # nothing random here
    if raw.get("error"):
      return skipped(raw["error"])
    try:
      record = records.unpack(raw["record"])
      ids = {k: v for k, v in record.items() if k.startswith("ids_")}
      if self.features:
        ids = {k: ids[k] for k in self.features}
      emb, mask = record["text_emb"], record["text_mask"]
    except (ValueError, KeyError):
      return skipped("bad_record")
    t = min(len(mask), self.text_length)
    text_emb = np.zeros((self.text_length, emb.shape[-1]), emb.dtype)
    text_emb[:t] = emb[:t]
    text_mask = np.zeros((self.text_length,), bool)
    text_mask[:t] = mask[:t]
    out = {k: v.astype(np.int32) for k, v in ids.items()}
    out.update(text_emb=text_emb, text_mask=text_mask)
    if "text_pooled" in record:
      out["text_pooled"] = np.array(record["text_pooled"])
    out.update(caption=record.get("caption", ""), key=record.get("key", raw["key"]))
    out[EVENTS_KEY] = []
    return out
