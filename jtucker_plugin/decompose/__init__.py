"""Low-rank decomposition of layer weights: joint Tucker-2 across tasks (J-Tucker) and per task."""

from jtucker_plugin.decompose.tucker import JointTucker, joint_spectrum, joint_tucker, tucker2

__all__ = ["JointTucker", "joint_spectrum", "joint_tucker", "tucker2"]
