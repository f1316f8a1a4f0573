"""Frame sampling and video decoding (PyAV).

`sample_indices` picks which T frames of an n-frame clip feed a bucket of T frames; it is shared by
decoded videos and clips already in memory (demo, TFDS). A clip shorter than needed is padded by
repeating its last frame, and the padded frames are marked False in the frame mask. A video is
read from a file or from its encoded bytes (a record of an ArrayRecord shard), the same way.
"""

import io

import av
import numpy as np

from univit_jax.run_config import data_config


def sample_indices(
    num_available: int, num_frames: int, sampling: str, stride: int,
    rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
  """Frame indices `[T]` (int64) into an n-frame clip and the frame mask `[T]` (bool).

  Args:
    num_available: n, frames in the clip (>= 1).
    num_frames: T, frames wanted.
    sampling: "uniform": one frame from each of T equal segments of the clip (its centre without
      rng, a random one with rng). "random_window": T frames `stride` apart starting at a random
      (or, without rng, the centred) offset; the stride shrinks when the clip is too short.
    stride: frame step of "random_window".
    rng: None for the deterministic evaluation choice.

  Raises:
    ValueError: for an unknown sampling, n < 1 or T < 1.
  """
  if sampling not in data_config.SAMPLINGS:
    raise ValueError(f"frame sampling {sampling!r}: expected one of {data_config.SAMPLINGS}")
  if num_available < 1 or num_frames < 1:
    raise ValueError(f"cannot sample {num_frames} frames from a clip of {num_available}")
  if num_available < num_frames:
    indices = np.minimum(np.arange(num_frames), num_available - 1)
    return indices.astype(np.int64), np.arange(num_frames) < num_available
  mask = np.ones(num_frames, bool)
  if sampling == "uniform":
    edges = np.linspace(0, num_available, num_frames + 1)
    if rng is None:
      offsets = (edges[:-1] + edges[1:]) / 2
    else:
      offsets = rng.uniform(edges[:-1], edges[1:])
    indices = np.minimum(np.floor(offsets), num_available - 1)
    return indices.astype(np.int64), mask
  if num_frames > 1:
    stride = max(1, min(stride, (num_available - 1) // (num_frames - 1)))
  span = (num_frames - 1) * stride + 1
  slack = num_available - span
  start = slack // 2 if rng is None else int(rng.integers(0, slack + 1))
  return (start + stride * np.arange(num_frames)).astype(np.int64), mask


def _indexed_frames(container: av.container.InputContainer, stream: av.VideoStream, first: int,
                    fps: float):
  """Yields (frame index, frame) in presentation order, starting at or before frame `first`.

  For `first > 0` it seeks to the keyframe before it and indexes frames by timestamp (constant
  frame rate assumed); a demuxer that lands past that keyframe (containers without a seek index,
  e.g. MPEG-TS, where decoding then starts at a later keyframe) is sent back to the start.
  Otherwise it decodes from the start and counts.

  Raises:
    ValueError: after a seek, a frame without timestamp.
  """
  if first <= 0:
    yield from enumerate(container.decode(stream))
    return
  offset = stream.start_time or 0
  container.seek(offset + int(first / fps / stream.time_base), stream=stream)
  frames = _timed(container.decode(stream), stream, fps)
  head = next(frames, None)
  if head is None or head[0] > first:
    container.seek(0)
    frames = _timed(container.decode(stream), stream, fps)
  else:
    yield head
  yield from frames


def _timed(frames, stream: av.VideoStream, fps: float):
  """(frame index, frame) pairs, the index from the frame's timestamp."""
  origin = float((stream.start_time or 0) * stream.time_base)
  for frame in frames:
    if frame.pts is None:
      raise ValueError("frames carry no timestamps, so start cannot be sought")
    yield int(round((float(frame.pts * stream.time_base) - origin) * fps)), frame


def _open(media: str | bytes) -> av.container.InputContainer:
  """Opens a video file, or a video's encoded bytes (a new reader each time: a container may
  close what it reads)."""
  return av.open(io.BytesIO(media) if isinstance(media, bytes) else media)


def _count_frames(media: str | bytes, limit: int | None) -> int:
  """Frames of the first video stream of a container whose header does not state its count
  (WebM, MKV, MPEG-TS, raw streams), counted from its packets (demuxed, not decoded: one packet
  per frame) up to `limit`."""
  count = 0
  with _open(media) as container:
    for packet in container.demux(container.streams.video[0]):
      if packet.size:  # the demuxer ends with an empty flush packet
        count += 1
      if limit is not None and count >= limit:
        break
  return count


def _decode_at(frames, indices: np.ndarray, total: int) -> dict[int, np.ndarray]:
  """The RGB frames at `indices` from (index, frame) pairs in order, decoding no further than the
  last one needed. Each wanted index takes the first frame at or after it (robust to timestamp
  rounding).

  Raises:
    ValueError: the frames end before the last wanted index (a truncated file).
  """
  targets = sorted(set(indices.tolist()))
  kept, pending, reached = {}, 0, -1
  for i, frame in frames:
    reached = i
    if i >= targets[pending]:
      array = frame.to_ndarray(format="rgb24")
      while pending < len(targets) and i >= targets[pending]:
        kept[targets[pending]] = array
        pending += 1
      if pending == len(targets):
        return kept
  raise ValueError(f"video ended at frame {reached} of the {total} it should have")


def read_clip(
    media: str | bytes, num_frames: int, sampling: str, stride: int,
    rng: np.random.Generator | None, start: float | None = None, end: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes T sampled frames of the first video stream of a file or of encoded bytes.

  Decoding starts at the keyframe before `start` and stops at the last frame needed, so the cost
  is about the length of the window, not of the video, and at most T decoded frames are held.
  When the container does not state its frame count, the frames are first counted from the
  demuxed packets (reading the file, not decoding it).

  Args:
    media: the video file, or its content.
    num_frames: T.
    sampling, stride, rng: as for `sample_indices`.
    start: window start in seconds (None: the beginning).
    end: window end in seconds (None: the end).

  Returns:
    frames uint8 `[T, H, W, 3]` and the frame mask `[T]`.

  Raises:
    ValueError: no video stream, no frame in the window, or fewer frames than the header or the
      packets say (a truncated file). PyAV's own errors (`av.FFmpegError`) propagate for
      undecodable files.
  """
  with _open(media) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if (start is not None or end is not None) and fps <= 0:
      raise ValueError("start / end given but the stream has no frame rate")
    first = int(round(start * fps)) if start is not None else 0
    stop = int(round(end * fps)) if end is not None else None
    total = stream.frames if stream.frames > 0 else _count_frames(media, stop)
    stop = total if stop is None else min(stop, total)
    if stop <= first:
      raise ValueError(f"no frame in the window [{start}, {end}] s of a {total}-frame video")
    indices, mask = sample_indices(stop - first, num_frames, sampling, stride, rng)
    indices = indices + first
    kept = _decode_at(_indexed_frames(container, stream, first, fps), indices, total)
    return np.stack([kept[i] for i in indices.tolist()]), mask
