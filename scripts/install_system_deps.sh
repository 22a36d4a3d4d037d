#!/usr/bin/env bash
# System libraries the Python packages expect on Debian/Ubuntu: FFmpeg's shared libraries, which
# torchcodec (LeRobot's default video decoder) loads. Without them LeRobot falls back to pyav and
# prints a long traceback at every start. Needs root and apt-get; elsewhere it only says what to do.
set -u
libs="libavutil57 libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4"
if ldconfig -p 2>/dev/null | grep -q 'libavutil\.so'; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: FFmpeg shared libraries not found; install them (e.g. 'apt-get install ffmpeg') for torchcodec." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $libs >/dev/null \
  || echo "note: could not install $libs; LeRobot will decode videos with pyav." >&2
exit 0
