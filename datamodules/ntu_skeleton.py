"""The NTU RGB+D ``.skeleton`` text format: file names, the frame/body/joint layout, body selection.

One file per sample, named ``SsssCcccPpppRrrrAaaa.skeleton`` (Kinect v2)::

    frame count
    per frame:   body count (0 when nobody is tracked)
      per body:  bodyID clippedEdges handLeftConfidence handLeftState handRightConfidence
                 handRightState isRestricted leanX leanY trackingState          (10 fields)
                 joint count (25)
                 per joint: x y z depthX depthY colorX colorY orientationW orientationX
                            orientationY orientationZ trackingState            (12 fields)

:func:`skeleton_array` turns one file's text into the (frames, 2, 25, 3) array the converter stores
(:mod:`datamodules.ntu_convert`); :class:`SkeletonFormatError` says why a file does not parse.
"""
from __future__ import annotations

import re

import numpy as np

NUM_JOINTS = 25
MAX_BODIES = 2                 # persons kept per sample (NTU's interactions have two)
KINECT_MAX_BODIES = 6          # Kinect v2 tracks at most six bodies: a larger count is corrupt
BODY_FIELDS = 10
JOINT_FIELDS = 12
NAME_PATTERN = re.compile(r"^S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})$")
META_FIELDS = ("setup", "camera", "performer", "replication", "action")


class SkeletonFormatError(ValueError):
    """One ``.skeleton`` file does not follow the layout: ``reason`` is one of REASONS, ``detail`` says where."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_sample_name(name: str) -> dict[str, int] | None:
    """``"S001C002P003R002A013"`` -> {"setup": 1, "camera": 2, "performer": 3, "replication": 2,
    "action": 13}; None when the name does not follow NTU's pattern."""
    match = NAME_PATTERN.match(name)
    if match is None:
        return None
    values = dict(zip(META_FIELDS, (int(group) for group in match.groups())))
    return values if all(values.values()) else None  # NTU numbers everything from 1


def parse_skeleton_text(text: str) -> list[list[tuple[int, np.ndarray]]]:
    """Parse one file's text into frames; each frame is a list of ``(body_id, joints (25, 3) float64)``.

    Raises SkeletonFormatError (reason in REASONS) on any departure from the layout.
    """
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SkeletonFormatError("empty file", "no text")
    ends_cleanly = text.endswith(("\n", "\r"))
    position = 0

    def fields(expected: int, what: str, wrong_count_reason: str = "wrong field count") -> list[str]:
        nonlocal position
        if position >= len(lines):
            raise SkeletonFormatError("truncated", f"the file ends at line {len(lines)} where {what} was expected")
        parts = lines[position].split()
        position += 1
        if len(parts) != expected:
            if position == len(lines) and not ends_cleanly:  # cut in the middle of the last line
                raise SkeletonFormatError("truncated", f"line {position} ({what}) stops after {len(parts)} fields")
            raise SkeletonFormatError(wrong_count_reason,
                                      f"line {position}: {what} has {len(parts)} fields, expected {expected}")
        return parts

    def integer(text_value: str, what: str) -> int:
        try:
            return int(text_value)
        except ValueError:
            raise SkeletonFormatError("non-numeric field", f"line {position}: {what} {text_value!r} is not an integer")

    frame_count = integer(fields(1, "the frame count")[0], "frame count")
    if frame_count < 0:
        raise SkeletonFormatError("non-numeric field", f"line 1: negative frame count {frame_count}")
    frames: list[list[tuple[int, np.ndarray]]] = []
    for frame in range(frame_count):
        body_count = integer(fields(1, f"the body count of frame {frame + 1}", "wrong body count")[0], "body count")
        if not 0 <= body_count <= KINECT_MAX_BODIES:
            raise SkeletonFormatError("wrong body count", f"line {position}: frame {frame + 1} declares {body_count} "
                                                          f"bodies (Kinect tracks 0-{KINECT_MAX_BODIES})")
        bodies = []
        for body in range(body_count):
            # A one-field line where body data should be means the frame had fewer bodies than declared.
            info = fields(BODY_FIELDS, f"body {body + 1} of frame {frame + 1}",
                          "wrong body count" if position < len(lines) and len(lines[position].split()) == 1
                          else "wrong field count")
            body_id = integer(info[0], "body ID")
            try:
                [float(value) for value in info[1:]]
            except ValueError:
                raise SkeletonFormatError("non-numeric field", f"line {position}: body fields {info[1:]} of frame "
                                                               f"{frame + 1} are not all numbers") from None
            joint_count = integer(fields(1, f"the joint count of body {body + 1}, frame {frame + 1}",
                                         "wrong joint count")[0], "joint count")
            if joint_count != NUM_JOINTS:
                raise SkeletonFormatError("wrong joint count", f"line {position}: {joint_count} joints, expected "
                                                               f"{NUM_JOINTS} (Kinect v2)")
            if position + NUM_JOINTS > len(lines):
                raise SkeletonFormatError("truncated", f"the file ends inside the joints of body {body + 1}, "
                                                       f"frame {frame + 1} (line {len(lines)})")
            rows = [line.split() for line in lines[position:position + NUM_JOINTS]]
            for offset, row in enumerate(rows):
                if len(row) != JOINT_FIELDS:
                    line_number = position + offset + 1
                    if line_number == len(lines) and not ends_cleanly:
                        raise SkeletonFormatError("truncated", f"line {line_number} (a joint) stops after "
                                                               f"{len(row)} fields")
                    # A body line or a count where a joint should be: the joint count was wrong.
                    reason = "wrong joint count" if len(row) in (1, BODY_FIELDS) else "wrong field count"
                    raise SkeletonFormatError(reason, f"line {line_number}: joint {offset + 1} of body {body + 1}, "
                                                      f"frame {frame + 1} has {len(row)} fields, expected {JOINT_FIELDS}")
            try:
                # float() over every field (all 12 must be numbers), then the first three: x, y, z.
                joints = np.array([float(value) for row in rows for value in row]).reshape(NUM_JOINTS, -1)[:, :3]
            except ValueError:
                raise SkeletonFormatError("non-numeric field", f"lines {position + 1}-{position + NUM_JOINTS}: joints "
                                                               f"of body {body + 1}, frame {frame + 1}") from None
            if not np.isfinite(joints).all():
                raise SkeletonFormatError("non-numeric field", f"lines {position + 1}-{position + NUM_JOINTS}: "
                                                               f"non-finite joint coordinates")
            position += NUM_JOINTS
            bodies.append((body_id, joints))
        frames.append(bodies)
    if position < len(lines):
        raise SkeletonFormatError("trailing data", f"{len(lines) - position} lines after the {frame_count} frames "
                                                   f"the file declares (from line {position + 1})")
    return frames


def select_bodies(frames: list[list[tuple[int, np.ndarray]]], max_bodies: int = MAX_BODIES,
                  min_body_frames: int = 11) -> np.ndarray:
    """The kept bodies of one sample: float32 (F, max_bodies, 25, 3), frames with no kept body dropped.

    A body is one body ID. IDs tracked in fewer than ``min_body_frames`` frames are dropped as noise
    (unless no ID is tracked that long); the others are ranked by motion (the variance over time of
    their joint coordinates, summed) and the ``max_bodies`` most active fill the slots in that order.
    Raises SkeletonFormatError("no skeleton") when no frame has a body.
    """
    tracks: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for index, bodies in enumerate(frames):
        seen = set()
        for body_id, joints in bodies:
            if body_id in seen:  # the same ID twice in one frame: keep its first record
                continue
            seen.add(body_id)
            frame_list, joint_list = tracks.setdefault(body_id, ([], []))
            frame_list.append(index)
            joint_list.append(joints)
    if not tracks:
        raise SkeletonFormatError("no skeleton", f"none of the {len(frames)} frames has a tracked body")
    candidates = [body_id for body_id, (frame_list, _) in tracks.items() if len(frame_list) >= min_body_frames]
    if not candidates:
        candidates = list(tracks)
    order = {body_id: rank for rank, body_id in enumerate(tracks)}  # first appearance breaks ties

    def motion(body_id: int) -> float:
        return float(np.stack(tracks[body_id][1]).var(axis=0).sum())

    kept = sorted(candidates, key=lambda b: (-motion(b), -len(tracks[b][0]), order[b]))[:max_bodies]
    out = np.zeros((len(frames), max_bodies, NUM_JOINTS, 3), dtype=np.float32)
    present = np.zeros(len(frames), dtype=bool)
    for slot, body_id in enumerate(kept):
        frame_list, joint_list = tracks[body_id]
        out[frame_list, slot] = np.stack(joint_list)
        present[frame_list] = True
    return out[present]


def skeleton_array(text: str, min_body_frames: int = 11) -> np.ndarray:
    """One file's text -> float32 (F, 2, 25, 3) (see :func:`parse_skeleton_text`, :func:`select_bodies`)."""
    return select_bodies(parse_skeleton_text(text), MAX_BODIES, min_body_frames)


# Sources ------------------------------------------------------------------------------------------
