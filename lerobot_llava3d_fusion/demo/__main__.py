"""``python -m lerobot_llava3d_fusion.demo``: the touch-block demo (see :mod:`.touch_block_demo`)."""

from lerobot_llava3d_fusion.demo.touch_block_demo import main

if __name__ == "__main__":
    main()
