"""Write a small LIBERO demonstration file from the simulator, in the layout of LIBERO's downloads.

``<suite>/<task>_demo.hdf5``: ``data`` attrs ``env_args`` / ``problem_info`` (JSON) /
``bddl_file_name``; per demo ``data/demo_<i>/{actions, states, rewards, dones}``, attr ``model_file`` and ``obs/{agentview_rgb,
eye_in_hand_rgb, ee_states, gripper_states, joint_states}``. ``states[t]`` and ``obs/*[t]`` are the
simulator before ``actions[t]``; images are robosuite's raw buffers (upside down, as in LIBERO's files).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUITE = "libero_spatial"
TASK_ID = 0


FOREIGN_LIBERO_ASSETS = "/home/someone/LIBERO/libero/libero/assets"
FOREIGN_ROBOSUITE_ASSETS = "/home/someone/robosuite/robosuite/models/assets"


def foreign_asset_paths(xml: str) -> str:
    """The model XML as LIBERO's files hold it: asset paths of the machine that recorded the demos."""
    import robosuite
    from libero.libero import get_libero_path

    robosuite_assets = str(Path(robosuite.__file__).parent / "models" / "assets")
    xml = xml.replace(str(get_libero_path("assets")), FOREIGN_LIBERO_ASSETS)
    xml = xml.replace(robosuite_assets, FOREIGN_ROBOSUITE_ASSETS)
    assert FOREIGN_LIBERO_ASSETS in xml and FOREIGN_ROBOSUITE_ASSETS in xml
    return xml


def write_libero_hdf5(
    path: Path, actions_per_demo: list[np.ndarray], size: int = 128, init_state_ids=(0, 1)
) -> dict:
    """Record one demo per entry of ``actions_per_demo`` (each (T, 7)) and write them to ``path``.

    Returns what the tests compare against: per demo the sim positions of a few objects at each step,
    and the task string.
    """
    import h5py
    from robosuite.utils.transform_utils import quat2axisangle

    from lerobot_llava3d_fusion.envs.libero_rgbd_sim import libero_rgbd_env_class, libero_suite

    suite = libero_suite(SUITE)
    env = libero_rgbd_env_class()(
        task_suite=suite, task_id=TASK_ID, task_suite_name=SUITE, obs_type="pixels_agent_pos",
        observation_height=size, observation_width=size, init_states=True,
    )  # fmt: skip
    task = suite.get_task(TASK_ID)
    truth: dict = {"task": task.language, "demos": []}
    try:
        env._ensure_env()
        sim_env = env._env
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as handle:
            data = handle.create_group("data")
            data.attrs["env_args"] = json.dumps(
                {"type": 1, "env_name": task.name, "problem_name": task.name,
                 "bddl_file": env._task_bddl_file,
                 "env_kwargs": {"camera_heights": size, "camera_widths": size, "control_freq": 20}}
            )  # fmt: skip
            data.attrs["problem_info"] = json.dumps(
                {"problem_name": task.name, "domain_name": "robosuite", "language_instruction": task.language}
            )
            # As in LIBERO's files: the path on the machine that made it (only folder and name are used).
            data.attrs["bddl_file_name"] = (
                f"/home/someone/LIBERO/libero/libero/bddl_files/{SUITE}/{task.bddl_file}"
            )
            for index, (actions, init_id) in enumerate(zip(actions_per_demo, init_state_ids, strict=False)):
                env.init_state_id = init_id
                env.reset()
                raw_obs = sim_env.env._get_observations(force_update=True)
                model_xml = foreign_asset_paths(sim_env.env.sim.model.get_xml())
                record = {k: [] for k in ("states", "agentview", "wrist", "ee", "gripper", "joints")}
                positions = []
                rewards, dones = [], []
                for action in actions:
                    record["states"].append(sim_env.get_sim_state())
                    record["agentview"].append(raw_obs["agentview_image"])
                    record["wrist"].append(raw_obs["robot0_eye_in_hand_image"])
                    record["ee"].append(
                        np.concatenate(
                            [raw_obs["robot0_eef_pos"], quat2axisangle(raw_obs["robot0_eef_quat"])]
                        )
                    )
                    record["gripper"].append(raw_obs["robot0_gripper_qpos"])
                    record["joints"].append(raw_obs["robot0_joint_pos"])
                    positions.append(
                        {
                            name: sim_env.sim.data.get_body_xpos(name).copy()
                            for name in ("plate_1_main", "akita_black_bowl_1_main")
                        }
                    )
                    raw_obs, reward, done, _ = sim_env.step(action.tolist())
                    rewards.append(reward)
                    dones.append(done)
                demo = data.create_group(f"demo_{index}")
                demo.attrs["num_samples"] = len(actions)
                demo.attrs["model_file"] = model_xml
                demo.create_dataset("actions", data=np.asarray(actions, dtype=np.float64))
                demo.create_dataset("states", data=np.asarray(record["states"]))
                demo.create_dataset("rewards", data=np.asarray(rewards, dtype=np.uint8))
                demo.create_dataset("dones", data=np.asarray(dones, dtype=np.uint8))
                obs = demo.create_group("obs")
                obs.create_dataset("agentview_rgb", data=np.asarray(record["agentview"]))
                obs.create_dataset("eye_in_hand_rgb", data=np.asarray(record["wrist"]))
                obs.create_dataset("ee_states", data=np.asarray(record["ee"]))
                obs.create_dataset("gripper_states", data=np.asarray(record["gripper"]))
                obs.create_dataset("joint_states", data=np.asarray(record["joints"]))
                truth["demos"].append({"positions": positions})
            data.attrs["num_demos"] = len(actions_per_demo)
    finally:
        env.close()
    return truth
