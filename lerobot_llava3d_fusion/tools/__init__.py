"""Data tools run from the command line: LIBERO set-up, RGB-D conversion and recording, RealSense intrinsics.

Nothing here is imported by the policy or the environments' registration.
"""
