"""Touch-block: a tiny closed-loop 3D reaching task whose solution needs depth.

A table (world plane ``z = 0``, z up, metres) carries ``num_blocks`` blocks of distinct colours and
random heights. The instruction names one colour ("touch the top of the red block") and the agent
moves a point end-effector with bounded 3D displacements and holds it there: an episode lasts
``episode_length`` steps and succeeds iff the end-effector is, at its last step, within
``success_radius`` of that block's top-centre.

Success is judged at the end, not whenever the end-effector crosses the target ball, because the
RGB image pins the target to one camera ray: a depth-blind policy that slides down that ray crosses
the ball in every episode (2 cm steps, 3 cm ball, nothing solid in the way). Having to hold at the
top makes the block height, hence depth, necessary: the sliding policy never succeeds and holding
at a fixed mid-range height succeeds in a minority of episodes, against ~100% when the height is
read from depth. Judging the end rather than a "stop" action also means a hesitant policy (one
whose actions shrink towards zero) keeps going instead of ending its episode there.

One pinhole camera looks, nominally, straight down from ``(0, 0, camera_height)``. It yields

* an RGB image in which the colours and the x/y layout are visible but block heights are not:
  surfaces are flat-coloured (no shading, no shadows) and every block is a *frustum block*, the
  extrusion of a square table footprint along the rays of the nominal camera (its walls point at
  the nominal camera centre). Seen from there, a block therefore covers exactly its footprint's
  pixels whatever its height and no wall is ever visible, so the RGB carries no size or parallax
  cue. With the defaults the walls lean by at most ~14 degrees from vertical. The blocks are
  world-fixed solids: a moved camera (`camera_translation_perturbation`,
  `camera_rotation_perturbation`) sees the same blocks, walls included, from its own pose;
* a metric depth image (z along the camera axis). From the nominal camera a block top of height
  ``h`` has depth exactly ``camera_height - h`` and the table has ``camera_height``;
  `depth_noise="sensor"` makes it what a RealSense D400 would report instead;
* its intrinsics (OpenCV convention, ``u`` = column) and camera-to-world extrinsics, so depth
  back-projects into the same world frame as the end-effector state.

The end-effector is rendered (RGB and depth, z-buffered against the scene) as a small white
sphere; the episode's ground truth is its centre, which is also the state.

For language-sensitivity evaluations the instruction the policy receives can be replaced
(`instruction_perturbation`, see :mod:`.instruction_perturbation`): with ``other_task`` it names
another block of the scene, and `success_target` says whether success is then judged at the block
the original instruction named or at the one the policy was told.

Rendering is a handful of vectorised numpy operations: each pixel's ray is intersected with the
table plane and with every block (a convex solid of six faces, clipped face by face) and the
nearest hit gives colour and depth; the end-effector is an analytic ray/sphere intersection. Static
blocks are rendered once per episode.

Importing this module registers the gymnasium id ``lerobot_llava3d_fusion/TouchBlock-v0``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lerobot_llava3d_fusion.envs.camera_perturbation import (
    check_camera_perturbation,
    draw_camera_perturbation,
)
from lerobot_llava3d_fusion.envs.instruction_perturbation import check_perturbation, perturb_instruction
from lerobot_llava3d_fusion.geometry.depth_noise import check_depth_noise, sensor_depth_noise
from lerobot_llava3d_fusion.observation_keys import DEPTH, EXTRINSICS, INTRINSICS, env_geometry_entry

GYM_ID = "lerobot_llava3d_fusion/TouchBlock-v0"
CAMERA_NAME = "top"
# The observation's camera geometry entries (one camera: `depth`, `intrinsics`, `extrinsics`).
DEPTH_ENTRY, INTRINSICS_ENTRY, EXTRINSICS_ENTRY = (
    env_geometry_entry(entry) for entry in (DEPTH, INTRINSICS, EXTRINSICS)
)
FPS = 10
DEFAULT_EPISODE_LENGTH = 60

# Flat colours; the table and end-effector colours are not in the palette so every block colour
# identifies exactly one block.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
TABLE_RGB = (128, 128, 128)
END_EFFECTOR_RGB = (255, 255, 255)
INSTRUCTION_TEMPLATE = "touch the top of the {colour} block"
SUCCESS_TARGETS = ("original", "instruction")

BLOCK_HALF_SIZE = 0.025  # half side of a block's square table footprint (m)
BLOCK_HEIGHT_RANGE = (0.02, 0.12)  # (m)
BLOCK_CENTRE_EXTENT = 0.15  # footprint centres are drawn in [-extent, extent]^2 (m)
BLOCK_GAP = 0.02  # minimum free space between two footprints (m)
END_EFFECTOR_RADIUS = 0.01  # rendered sphere radius (m); the state is its centre
END_EFFECTOR_START_Z = (0.20, 0.30)  # start height range (m), above every block top
WORKSPACE_LOW = np.array([-0.2, -0.2, 0.0])  # end-effector position bounds (m)
WORKSPACE_HIGH = np.array([0.2, 0.2, 0.4])
VIEW_HALF_EXTENT = 0.2  # half of the table extent seen along the smaller image side (m)
CAMERA_HEIGHT = 1.0  # nominal camera centre above the table origin (m)


@dataclass(frozen=True)
class Scene:
    """One block arrangement.

    Attributes:
        footprint_centres: (N, 2) float64, centres of the blocks' square table footprints (world x, y).
        heights: (N,) float64, block heights (m).
        colours: N distinct colour names, keys of `PALETTE`.
        target: index of the block named by the instruction.
    """

    footprint_centres: np.ndarray
    heights: np.ndarray
    colours: tuple[str, ...]
    target: int

    @property
    def instruction(self) -> str:
        return self.instruction_for(self.target)

    def instruction_for(self, block: int) -> str:
        """The instruction naming block `block`."""
        return INSTRUCTION_TEMPLATE.format(colour=self.colours[block])


def sample_scene(rng: np.random.Generator, num_blocks: int) -> Scene:
    """Draws non-overlapping footprints, independent heights, distinct colours and a target."""
    if not 1 <= num_blocks <= len(PALETTE):
        raise ValueError(f"num_blocks must be in [1, {len(PALETTE)}], got {num_blocks}")
    min_centre_distance = 2 * BLOCK_HALF_SIZE + BLOCK_GAP
    centres: list[np.ndarray] = []
    # Rejection sampling; at most 4 blocks of 5 cm in a 30 cm square, so this ends in a few draws.
    for _ in range(10_000):
        candidate = rng.uniform(-BLOCK_CENTRE_EXTENT, BLOCK_CENTRE_EXTENT, size=2)
        # Axis-aligned squares are disjoint iff their centres are far enough apart along some axis.
        if all(np.abs(candidate - c).max() >= min_centre_distance for c in centres):
            centres.append(candidate)
            if len(centres) == num_blocks:
                break
    else:
        raise RuntimeError(f"could not place {num_blocks} non-overlapping blocks")
    colour_ids = rng.choice(len(PALETTE), size=num_blocks, replace=False)
    return Scene(
        footprint_centres=np.stack(centres),
        heights=rng.uniform(*BLOCK_HEIGHT_RANGE, size=num_blocks),
        colours=tuple(list(PALETTE)[i] for i in colour_ids),
        target=int(rng.integers(num_blocks)),
    )


@dataclass(frozen=True)
class CameraPose:
    """A camera pose: `rotation` (3, 3) camera-to-world (OpenCV axes: x right, y down, z forward) and
    `position` (3,) the camera centre in the world (m)."""

    rotation: np.ndarray
    position: np.ndarray

    @property
    def extrinsics(self) -> np.ndarray:
        """(4, 4) float64 camera-to-world transform."""
        extrinsics = np.eye(4)
        extrinsics[:3, :3], extrinsics[:3, 3] = self.rotation, self.position
        return extrinsics


def nominal_camera_pose(camera_height: float) -> CameraPose:
    """The straight-down camera at (0, 0, camera_height): its x axis is world +x, its y axis world -y
    (image rows grow towards -y) and its z axis world -z."""
    return CameraPose(np.diag([1.0, -1.0, -1.0]), np.array([0.0, 0.0, camera_height]))


def perturbed_camera_pose(
    nominal: CameraPose, rng: np.random.Generator, max_translation: float, max_rotation_deg: float
) -> CameraPose:
    """`nominal` moved as `camera_perturbation.draw_camera_perturbation` draws it."""
    shift, turn = draw_camera_perturbation(rng, max_translation, max_rotation_deg)
    return CameraPose(nominal.rotation @ turn, nominal.position + shift)


def _ray_convex_solid(
    origin: np.ndarray, directions: np.ndarray, normals: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where rays enter a convex solid {x : normals @ x <= offsets} (Cyrus-Beck clipping).

    Args:
        origin: (3,) ray origin, outside the solid.
        directions: (P, 3) ray directions; a ray's points are origin + t * direction, t >= 0.
        normals: (F, 3) outward face normals; offsets: (F,).

    Returns:
        hit: (P,) bool, whether the ray meets the solid; t_enter: (P,) its entry parameter.
    """
    along = directions @ normals.T  # (P, F): how fast each face's constraint grows along the ray
    slack = offsets - normals @ origin  # (F,): >= 0 where the origin satisfies the face's constraint
    with np.errstate(divide="ignore", invalid="ignore"):
        t_face = slack / along  # (P, F): where the ray crosses each face plane
    t_enter = np.where(along < 0, t_face, 0.0).max(axis=1)
    t_exit = np.where(along > 0, t_face, np.inf).min(axis=1)
    parallel_outside = ((along == 0) & (slack < 0)).any(axis=1)
    return (t_enter <= t_exit) & ~parallel_outside, t_enter


class TouchBlockRenderer:
    """Ray-casting renderer of the table, the blocks and the end-effector from any camera pose.

    The blocks are world-fixed convex solids: frustum blocks whose walls point at the nominal camera
    centre (0, 0, camera_height), top at the block height, bottom on the table. Seen from the nominal
    camera they cover exactly their footprints and show no wall; from a moved camera their walls show.

    Attributes:
        intrinsics: (3, 3) float32, OpenCV pinhole matrix: ``x = (u - cx) * z / fx``, u = column.
        camera_pose: the pose the next renders are made from (`nominal_camera_pose` until changed).
        extrinsics: (4, 4) float32, camera-to-world transform of `camera_pose`.
    """

    def __init__(
        self, height: int, width: int, camera_height: float = 1.0, view_half_extent: float = VIEW_HALF_EXTENT
    ):
        if height < 8 or width < 8:
            raise ValueError(f"image size must be at least 8x8, got {height}x{width}")
        if camera_height <= WORKSPACE_HIGH[2] + END_EFFECTOR_RADIUS:
            raise ValueError(
                f"camera_height must exceed the workspace top ({WORKSPACE_HIGH[2]} m), got {camera_height}"
            )
        if view_half_extent <= 0:
            raise ValueError(f"view_half_extent must be positive, got {view_half_extent}")
        self.height, self.width, self.camera_height = height, width, camera_height

        # Square pixels; the smaller image side spans 2 * view_half_extent on the table (nominal camera).
        focal = min(height, width) * camera_height / (2 * view_half_extent)
        cx, cy = (width - 1) / 2, (height - 1) / 2  # integer pixel coordinates are pixel centres
        self.intrinsics = np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]], dtype=np.float32)
        # Camera-frame ray of every pixel centre, scaled to unit camera depth: (H, W, 3), so that a
        # ray parameter t is the camera z-depth of its point.
        ray_x, ray_y = np.meshgrid((np.arange(width) - cx) / focal, (np.arange(height) - cy) / focal)
        self._camera_rays = np.stack([ray_x, ray_y, np.ones_like(ray_x)], axis=-1)
        self._camera_rays_sq = ray_x**2 + ray_y**2 + 1.0  # (H, W) squared ray lengths
        self.set_camera_pose(nominal_camera_pose(camera_height))

    def set_camera_pose(self, pose: CameraPose) -> None:
        """Renders from `pose` from now on (a camera above the table, looking down at it)."""
        self.camera_pose = pose
        self.extrinsics = pose.extrinsics.astype(np.float32)
        self._world_rays = self._camera_rays @ pose.rotation.T  # (H, W, 3)

    def block_solids(self, scene: Scene) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each block as (normals (6, 3), offsets (6,)): the solid {x : normals @ x <= offsets}."""
        apex_height = self.camera_height
        solids = []
        for centre, height in zip(scene.footprint_centres, scene.heights, strict=True):
            normals, offsets = [[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], [height, 0.0]  # top, bottom
            for axis in (0, 1):
                for side in (-1.0, 1.0):
                    # The wall through the footprint edge {x_axis = edge, z = 0} and the apex
                    # (0, 0, apex_height):
                    #   side * (apex_height * x_axis + edge * z) <= side * apex_height * edge.
                    edge = centre[axis] + side * BLOCK_HALF_SIZE
                    normal = np.zeros(3)
                    normal[axis], normal[2] = side * apex_height, side * edge
                    normals.append(normal)
                    offsets.append(side * apex_height * edge)
            solids.append((np.array(normals, dtype=np.float64), np.array(offsets, dtype=np.float64)))
        return solids

    def render_blocks(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """Renders table and blocks: the nearest surface along each pixel's ray.

        Returns:
            rgb: (H, W, 3) uint8.
            depth: (1, H, W) float32, metres along the camera z axis; 0 where a ray meets nothing.
        """
        origin = self.camera_pose.position
        rays = self._world_rays.reshape(-1, 3)  # (P, 3)
        rgb = np.zeros((rays.shape[0], 3), dtype=np.uint8)
        depth = np.full(rays.shape[0], np.inf)
        with np.errstate(divide="ignore"):
            t_table = np.where(rays[:, 2] < 0, -origin[2] / rays[:, 2], np.inf)
        on_table = np.isfinite(t_table)
        rgb[on_table], depth[on_table] = TABLE_RGB, t_table[on_table]
        for (normals, offsets), colour in zip(self.block_solids(scene), scene.colours, strict=True):
            hit, t_enter = _ray_convex_solid(origin, rays, normals, offsets)
            nearer = hit & (t_enter < depth)
            rgb[nearer], depth[nearer] = PALETTE[colour], t_enter[nearer]
        depth[~np.isfinite(depth)] = 0.0
        rgb = rgb.reshape(self.height, self.width, 3)
        return rgb, depth.reshape(1, self.height, self.width).astype(np.float32)

    def add_end_effector(
        self, rgb: np.ndarray, depth: np.ndarray, position: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Z-buffers the end-effector sphere centred at world `position` (3,) into copies of rgb/depth."""
        pose = self.camera_pose
        q = pose.rotation.T @ (np.asarray(position, dtype=np.float64) - pose.position)  # camera frame
        # Points on a pixel ray are z * a; solve |z * a - q|^2 = r^2 for the near z.
        a_dot_q = self._camera_rays @ q
        a_sq = self._camera_rays_sq
        disc = a_dot_q**2 - a_sq * (q @ q - END_EFFECTOR_RADIUS**2)
        z = (a_dot_q - np.sqrt(np.maximum(disc, 0.0))) / a_sq
        visible = (depth[0] == 0) | (z < depth[0])  # nothing behind (0) or nearer than the scene
        hit = (disc >= 0) & (z > 0) & visible
        rgb, depth = rgb.copy(), depth.copy()
        rgb[hit] = END_EFFECTOR_RGB
        depth[0][hit] = z[hit]
        return rgb, depth

    def render(self, scene: Scene, ee_position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Renders the full view: rgb (H, W, 3) uint8 and depth (1, H, W) float32."""
        return self.add_end_effector(*self.render_blocks(scene), ee_position)

    def block_top_centres(self, scene: Scene) -> np.ndarray:
        """(N, 3) world centres of the block tops.

        A frustum block's top is its footprint shrunk towards the camera axis by
        (camera_height - h) / camera_height, so the top-centre is the footprint centre scaled alike.
        """
        scale = (self.camera_height - scene.heights) / self.camera_height
        return np.concatenate([scene.footprint_centres * scale[:, None], scene.heights[:, None]], axis=1)


def expert_action(ee_position: np.ndarray, target: np.ndarray, max_step: float) -> np.ndarray:
    """Scripted expert: straight to the target top, all axes in proportion, then hold there.

    The action is a continuous function of the end-effector position: a full step (the largest axis
    at `max_step`) along the line to the target while it is more than a step away, the exact
    remaining offset after that, zero once there. A gated expert ("above the block first, down only
    once within a few millimetres in x/y") teaches a policy whose x/y estimate is slightly off to
    hover above the block forever; this one teaches it to descend while it corrects. Blocks are not
    obstacles (the env has no contact), so the straight line needs no clearance.

    Args:
        ee_position: (3,) current end-effector position.
        target: (3,) target top-centre.
        max_step: the env's displacement per unit action (m).

    Returns:
        (3,) float32 action in [-1, 1].
    """
    offset = (np.asarray(target) - np.asarray(ee_position)) / max_step  # in actions
    return (offset / max(1.0, float(np.abs(offset).max()))).astype(np.float32)


def check_instruction_options(instruction_perturbation: str, success_target: str, num_blocks: int) -> None:
    """Raises a ValueError for an unknown or meaningless combination of the instruction options."""
    check_perturbation(instruction_perturbation)
    if success_target not in SUCCESS_TARGETS:
        raise ValueError(f"success_target must be one of {SUCCESS_TARGETS}, got {success_target!r}")
    if success_target == "instruction" and instruction_perturbation != "other_task":
        raise ValueError(
            "success_target='instruction' needs instruction_perturbation='other_task' (only then does the "
            f"instruction name another block), got instruction_perturbation={instruction_perturbation!r}"
        )
    if instruction_perturbation == "other_task" and num_blocks < 2:
        raise ValueError(
            "instruction_perturbation='other_task' needs num_blocks >= 2 (another block to name), "
            f"got {num_blocks}"
        )


def check_camera_options(translation_perturbation: float, rotation_perturbation: float) -> None:
    """Raises a ValueError for camera perturbations that would not keep the camera above the
    workspace, looking at the table."""
    max_translation = CAMERA_HEIGHT - WORKSPACE_HIGH[2] - END_EFFECTOR_RADIUS
    check_camera_perturbation(translation_perturbation, rotation_perturbation, max_translation)


def _matrix_space(matrix: np.ndarray, fixed: bool) -> spaces.Box:
    """A fixed camera's constant matrix is bounded by its own entries. A moving camera's extrinsics
    hold rotation entries in [-1, 1] and a position within 2 * CAMERA_HEIGHT of the table origin."""
    if not fixed:
        return spaces.Box(-2 * CAMERA_HEIGHT, 2 * CAMERA_HEIGHT, matrix.shape, np.float32)
    return spaces.Box(float(matrix.min()), float(matrix.max()), matrix.shape, np.float32)


class TouchBlockEnv(gym.Env):
    """Gymnasium env for the touch-block task.

    Observation (dict):
        pixels: {"top": (H, W, 3) uint8}
        agent_pos: (3,) float32, end-effector xyz in the world frame (m).
        depth: (1, H, W) float32, metres along the camera z axis (0 would mean invalid; every
            pixel sees the table here).
        intrinsics: (3, 3) float32, pinhole matrix of the depth/RGB pixel grid.
        extrinsics: (4, 4) float32, camera-to-world transform.
    LeRobot's `preprocess_observation` maps these to `observation.images.top`, `observation.state`,
    `observation.depth`, `observation.intrinsics` and `observation.extrinsics`; the env processor of
    `TouchBlockEnvConfig` appends the camera name to the last three.

    Action: (3,) float32 in [-1, 1], scaled by `max_step` into an end-effector displacement; the
    position is clipped to the workspace box. The episode never terminates early; it is truncated
    after `episode_length` steps, and succeeds (`info["is_success"]`, reward 1, both only at that
    last step) iff the end-effector is then within `success_radius` of the target block's
    top-centre. At every step `info` also says where the end-effector is relative to the target:
    `distance` (m), `at_target` (within the radius), `xy_error` (horizontal distance to the target's
    top-centre), `height_error` (signed, end-effector z minus the top's) and `nearest_block_is_target`
    (whether, of all blocks, the target's top-centre is the nearest in x/y: the policy went to the
    block it was meant to, however precisely). LeRobot's vector envs hand the last step's `info` on
    as `final_info`; `touch_block_outcomes` reads them from there.

    The instruction (`task_description`) names the target block, unless `instruction_perturbation`
    (one of `instruction_perturbation.PERTURBATIONS`) replaces it at each reset, drawing from the
    env's seeded generator after the scene and the start position (which are therefore those of the
    unperturbed env). With ``other_task`` it names another block of the scene, and the target is the
    block the original instruction named (`success_target="original"`) or the one the perturbed
    instruction names (``"instruction"``, only with ``other_task``).

    Robustness options: `camera_translation_perturbation` (m) and `camera_rotation_perturbation`
    (degrees) move the camera at each reset by a shift drawn uniformly in [-t, t] along each world
    axis and a turn drawn uniformly in [-r, r] about each camera axis (`camera_perturbation`),
    drawn from the env's seeded generator after everything else (a seed gives the scene, start and
    instruction of the unperturbed env); 0 keeps the nominal straight-down camera. The observed
    intrinsics/extrinsics are those of the rendered view. `depth_noise="sensor"` replaces the exact
    depth of every observation by what a RealSense D400 would report (`geometry.depth_noise`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}
    task = "touch_block"

    def __init__(
        self,
        observation_height: int = 64,
        observation_width: int = 64,
        num_blocks: int = 3,
        max_step: float = 0.02,
        success_radius: float = 0.015,
        render_mode: str | None = "rgb_array",
        episode_length: int = DEFAULT_EPISODE_LENGTH,
        instruction_perturbation: str = "none",
        success_target: str = "original",
        camera_translation_perturbation: float = 0.0,
        camera_rotation_perturbation: float = 0.0,
        depth_noise: str = "none",
    ):
        super().__init__()
        if episode_length < 1:
            raise ValueError(f"episode_length must be positive, got {episode_length}")
        self.episode_length = episode_length
        self._elapsed_steps = 0
        if not 1 <= num_blocks <= len(PALETTE):
            raise ValueError(f"num_blocks must be in [1, {len(PALETTE)}], got {num_blocks}")
        if max_step <= 0:
            raise ValueError(f"max_step must be positive, got {max_step}")
        if success_radius <= 0:
            raise ValueError(f"success_radius must be positive, got {success_radius}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        check_instruction_options(instruction_perturbation, success_target, num_blocks)
        self.instruction_perturbation, self.success_target = instruction_perturbation, success_target
        self.num_blocks, self.max_step, self.success_radius = num_blocks, max_step, success_radius
        self.render_mode = render_mode
        check_camera_options(camera_translation_perturbation, camera_rotation_perturbation)
        check_depth_noise(depth_noise)
        self.camera_translation_perturbation = camera_translation_perturbation
        self.camera_rotation_perturbation = camera_rotation_perturbation
        self.depth_noise = depth_noise
        self.renderer = TouchBlockRenderer(observation_height, observation_width, camera_height=CAMERA_HEIGHT)
        fixed_camera = camera_translation_perturbation == 0 and camera_rotation_perturbation == 0
        exact_depth = fixed_camera and depth_noise == "none"

        h, w = observation_height, observation_width
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Dict({CAMERA_NAME: spaces.Box(0, 255, (h, w, 3), np.uint8)}),
                "agent_pos": spaces.Box(
                    WORKSPACE_LOW.astype(np.float32), WORKSPACE_HIGH.astype(np.float32), dtype=np.float32
                ),
                # A moved camera looks at the table obliquely (at most ~60 degrees off its axis).
                DEPTH_ENTRY: spaces.Box(
                    0.0, self.renderer.camera_height * (1 if exact_depth else 4), (1, h, w), np.float32
                ),
                INTRINSICS_ENTRY: _matrix_space(self.renderer.intrinsics, fixed=True),
                EXTRINSICS_ENTRY: _matrix_space(self.renderer.extrinsics, fixed=fixed_camera),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (3,), np.float32)

        self.scene: Scene | None = None
        self._instruction = ""
        self.target_block = 0  # index of the block success is judged at
        self.ee_position = np.zeros(3)
        self._blocks_rgb: np.ndarray | None = None
        self._blocks_depth: np.ndarray | None = None
        self._rgb: np.ndarray | None = None
        self._depth_noise_rng: np.random.Generator | None = None

    @property
    def task_description(self) -> str:
        """The current episode's instruction; LeRobot's eval passes it to the policy as the task."""
        self._require_scene()
        return self._instruction

    @property
    def target_position(self) -> np.ndarray:
        """(3,) world top-centre of the target block (privileged; for the expert and metrics)."""
        return self.renderer.block_top_centres(self._require_scene())[self.target_block]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """`options["target_block"]` (an index into the scene's blocks) names that block instead of the
        drawn one: the same seed then gives the same scene and start with another instruction.
        `options["start_offset"]` (3,) metres starts the end-effector at the target block's top-centre
        plus that offset (clipped to the workspace; below the top it is inside the block, hidden from
        the camera) instead of the drawn start, e.g. to record how to come back to the target. Other
        options (LeRobot passes a rollout marker) are ignored."""
        super().reset(seed=seed)
        options = options or {}
        self.scene = sample_scene(self.np_random, self.num_blocks)
        target_block = options.get("target_block")
        if target_block is not None:
            if not 0 <= target_block < self.num_blocks:
                raise ValueError(f"target_block must be in [0, {self.num_blocks}), got {target_block}")
            self.scene = replace(self.scene, target=int(target_block))
        xy = self.np_random.uniform(-BLOCK_CENTRE_EXTENT, BLOCK_CENTRE_EXTENT, size=2)
        self.ee_position = np.array([*xy, self.np_random.uniform(*END_EFFECTOR_START_Z)])
        self._instruction, self.target_block = self._instruction_and_target(self.scene)
        start_offset = options.get("start_offset")
        if start_offset is not None:
            start_offset = np.asarray(start_offset, dtype=np.float64)
            if start_offset.shape != (3,) or not np.isfinite(start_offset).all():
                raise ValueError(
                    f"start_offset must be 3 finite numbers (m), got {options['start_offset']!r}"
                )
            self.ee_position = np.clip(self.target_position + start_offset, WORKSPACE_LOW, WORKSPACE_HIGH)
        self.renderer.set_camera_pose(self._draw_camera_pose())
        if self.depth_noise == "sensor":
            self._depth_noise_rng = np.random.default_rng(self.np_random.integers(2**63))
        self._blocks_rgb, self._blocks_depth = self.renderer.render_blocks(self.scene)
        self._elapsed_steps = 0
        return self._observation(), {"is_success": False, **self._position_info()}

    def step(self, action: np.ndarray):
        self._require_scene()
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (3,):
            raise ValueError(f"action must have shape (3,), got {action.shape}")
        action = np.clip(action, -1.0, 1.0)
        self.ee_position = np.clip(self.ee_position + action * self.max_step, WORKSPACE_LOW, WORKSPACE_HIGH)
        self._elapsed_steps += 1
        position_info = self._position_info()
        last_step = self._elapsed_steps >= self.episode_length
        success = last_step and position_info["at_target"]
        info = {"is_success": success, **position_info}
        return self._observation(), float(success), False, last_step, info

    def render(self) -> np.ndarray | None:
        """(H, W, 3) uint8 camera image of the current state, or None when render_mode is None."""
        if self.render_mode is None:
            return None
        if self._rgb is None:
            raise RuntimeError("call reset() before render()")
        return self._rgb.copy()

    def _draw_camera_pose(self) -> CameraPose:
        nominal = nominal_camera_pose(self.renderer.camera_height)
        if self.camera_translation_perturbation == 0 and self.camera_rotation_perturbation == 0:
            return nominal
        return perturbed_camera_pose(
            nominal, self.np_random, self.camera_translation_perturbation, self.camera_rotation_perturbation
        )

    def _observation(self) -> dict[str, Any]:
        self._rgb, depth = self.renderer.add_end_effector(
            self._blocks_rgb, self._blocks_depth, self.ee_position
        )
        if self.depth_noise == "sensor":
            depth = sensor_depth_noise(depth, self._depth_noise_rng)
        return {
            "pixels": {CAMERA_NAME: self._rgb.copy()},
            "agent_pos": self.ee_position.astype(np.float32),
            DEPTH_ENTRY: depth,
            INTRINSICS_ENTRY: self.renderer.intrinsics.copy(),
            EXTRINSICS_ENTRY: self.renderer.extrinsics.copy(),
        }

    def _instruction_and_target(self, scene: Scene) -> tuple[str, int]:
        """The instruction given to the policy and the index of the block success is judged at."""
        block_instructions = [scene.instruction_for(block) for block in range(len(scene.colours))]
        instruction = perturb_instruction(
            scene.instruction, self.instruction_perturbation, self.np_random, block_instructions
        )
        if self.success_target == "instruction":
            return instruction, block_instructions.index(instruction)
        return instruction, scene.target

    def _position_info(self) -> dict[str, float | bool]:
        """Where the end-effector is relative to the target (the `info` entries of the class doc)."""
        tops = self.renderer.block_top_centres(self.scene)
        offset = self.ee_position - tops[self.target_block]
        distance = float(np.linalg.norm(offset))
        xy_distances = np.linalg.norm(tops[:, :2] - self.ee_position[:2], axis=1)
        return {
            "distance": distance,
            "at_target": distance <= self.success_radius,
            "xy_error": float(np.linalg.norm(offset[:2])),
            "height_error": float(offset[2]),
            "nearest_block_is_target": int(np.argmin(xy_distances)) == self.target_block,
        }

    def _require_scene(self) -> Scene:
        if self.scene is None:
            raise RuntimeError("call reset() before using the environment")
        return self.scene


# Guarded so that re-importing (e.g. after importlib.reload) does not re-register.
if GYM_ID not in gym.registry:
    gym.register(
        id=GYM_ID,
        entry_point="lerobot_llava3d_fusion.envs.touch_block:TouchBlockEnv",
        max_episode_steps=DEFAULT_EPISODE_LENGTH,
    )
