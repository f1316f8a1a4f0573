"""A tiny in-memory source with the demo record shape, for pipeline tests."""

import numpy as np


class FakeSource:
  """`n` records: `frames` uint8 [num_frames, size, size, 3] whose pixels encode the index.

  Every pixel of record i equals i % 256, so an example can be traced back to its record; with
  `boxes`, records carry 4 boxes (2 valid) like the demo data.
  """

  def __init__(self, n: int, num_frames: int = 1, size: int = 16, boxes: bool = False):
    self.n, self.num_frames, self.size, self.boxes = n, num_frames, size, boxes

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.n:
      raise IndexError(index)
    frames = np.full((self.num_frames, self.size, self.size, 3), index % 256, np.uint8)
    record = dict(id=np.int64(index), frames=frames, label=np.int32(index % 7))
    if self.boxes:
      record.update(
        boxes=np.array([[0.1, 0.1, 0.6, 0.6], [0.2, 0.3, 0.9, 0.8], [0, 0, 0, 0], [0, 0, 0, 0]],
                       np.float32),
        box_labels=np.array([index % 5, 1, 0, 0], np.int32),
        box_mask=np.array([True, True, False, False]))
    return record
