"""Moving cameras: delta state aligned to the scene, so that pans and tilts stay sparse.

    mm = deltacnn.motion.MotionDeltaModel(deltacnn.convert(cnn, frame), motion="auto")
    out = mm(frame)        # camera coordinates; equals dense inference for pans by multiples of the stride

See aligned.py for the design and its costs, estimate.py for the motion conventions.
"""
from .aligned import MotionNotSupportedError, StateAligner, StateGeometry, map_outputs, probe_geometry, translate
from .estimate import MIN_CONFIDENCE, MotionEstimate, PhaseCorrelator, given_motion
from .files import MotionFileError, load_motion_file, resolve_motion
from .model import MotionDeltaModel, MotionSequenceError, motion_record

__all__ = ["MotionDeltaModel", "PhaseCorrelator", "MotionEstimate", "given_motion", "translate", "map_outputs",
           "probe_geometry", "StateAligner", "StateGeometry", "MotionNotSupportedError", "MIN_CONFIDENCE",
           "MotionFileError", "MotionSequenceError", "load_motion_file", "resolve_motion", "motion_record"]
