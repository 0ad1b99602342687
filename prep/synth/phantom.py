"""A 3D phantom of one lumbar spine in patient coordinates (DICOM LPS, mm), sampled by every series of a study.

The spine is laid along a circular arc in the sagittal (y, z) plane (the lordosis), so every structure is defined in
straightened "spine coordinates": ``s`` = arc length along the centreline (mm, increasing inferiorly, 0 at the L1/L2
disc), ``b`` = distance posterior of the centreline (mm), ``x`` = distance to the patient's left of the (slightly
scoliotic) midline. Discs are perpendicular to the arc, so they are wedge-shaped like real lumbar discs.

Severity is drawn where it is labelled, as anatomy rather than as a marker:
- canal stenosis: a disc bulge from the front and a thickened ligamentum flavum from the back shrink the CSF column
  (bright on T2) at that disc;
- foraminal narrowing: the fat of the foramen (bright on T1) shrinks around the exiting nerve root on that side;
- subarticular stenosis: the lateral recess (CSF beside the thecal sac, under the facet) closes on that side.
``inside`` answers which nominal structure a point lies in, which the tests use to check the label coordinates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from cache.rsna import CONDITION_GROUP, CONDITION_SIDE, LEVELS

# Tissue classes; a contrast maps each one to an MR intensity.
AIR, SOFT, FAT, MUSCLE, MARROW, CORTEX, ANNULUS, NUCLEUS, CSF, NERVE, LIGAMENT = range(11)
TISSUE_NAMES = ("air", "soft", "fat", "muscle", "marrow", "cortex", "annulus", "nucleus", "csf", "nerve", "ligament")
# Intensities (arbitrary scanner units, like real MR magnitudes: hundreds to a few thousand).
CONTRASTS: dict[str, tuple[float, ...]] = {
    #        air soft  fat  musc marrow cortex annul nucl  csf  nerve lig
    "T1": (0, 650, 1350, 480, 950, 90, 420, 520, 260, 560, 330),
    "T2": (0, 520, 900, 300, 520, 70, 220, 1250, 1900, 480, 200),
    "STIR": (0, 600, 120, 260, 240, 60, 200, 1100, 1700, 520, 180),
}
N_DISCS = 8  # T10/T11 .. L5/S1: the sagittal field of view reaches well above L1
FIRST_LEVEL = 3  # index of L1/L2 among the discs
SIDES = ("right", "left")  # index 0 = patient right (x < 0), 1 = patient left (x > 0)


@dataclass
class Phantom:
    """Geometry and severity of one spine. Arrays are per disc (N_DISCS) or per (disc, side)."""

    origin: list[float]  # patient position of the centreline at s = 0 (the L1/L2 disc centre)
    phi0: float  # angle of the inferior tangent at s = 0 (0 = straight down, > 0 = tilted posteriorly)
    kappa: float  # curvature of the lordosis, 1/mm (centre of curvature is posterior)
    disc_s: list[float]  # arc length of each disc centre
    disc_h: list[float]  # disc heights
    body_rx: list[float]  # vertebral body half-width below each disc
    body_ry: list[float]  # vertebral body half-depth
    shift_x: list[float]  # lateral shift of the midline at each disc (mild scoliosis)
    canal_w: float  # canal half-width (nominal, mm)
    canal_d: float  # canal half-depth
    foramen_x: list[list[float]]  # |x| of the foramen centre per (disc, side)
    recess_x: float  # |x| of the lateral recess centre
    g_canal: list[float] = field(default_factory=lambda: [0.0] * N_DISCS)  # compression 0..1 per disc
    g_foramen: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0] for _ in range(N_DISCS)])
    g_recess: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0] for _ in range(N_DISCS)])
    tissue_gain: list[float] = field(default_factory=lambda: [1.0] * len(TISSUE_NAMES))  # per-study contrast jitter
    texture: list[list[float]] = field(default_factory=list)  # smooth 3D intensity texture: (kx, ky, kz, phase, amp)
    coil: list[float] = field(default_factory=lambda: [0.0, 0.0])  # bias field: posterior gain, lateral fall-off

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def random(cls, rng: np.random.Generator) -> Phantom:
        disc_h = rng.uniform(8.0, 12.0, N_DISCS)
        disc_h[:FIRST_LEVEL] = rng.uniform(5.0, 7.0, FIRST_LEVEL)  # thoracic discs are thinner
        disc_h[-1] = rng.uniform(7.5, 10.0)
        body_h = rng.uniform(24.0, 29.0, N_DISCS)
        disc_s = np.zeros(N_DISCS)
        for k in range(1, N_DISCS):  # walk down the column: half a disc, a vertebral body, half a disc
            disc_s[k] = disc_s[k - 1] + disc_h[k - 1] / 2 + body_h[k] + disc_h[k] / 2
        disc_s -= disc_s[FIRST_LEVEL]
        canal_w = float(rng.uniform(10.0, 12.0))
        shift = np.convolve(rng.normal(0, 1.0, N_DISCS + 2), np.ones(3) / 3, mode="valid")  # smooth, small
        return cls(
            origin=[float(v) for v in rng.normal(0, 15, 3) + (0.0, 30.0, 60.0)],
            phi0=float(rng.uniform(-0.35, -0.1)),
            kappa=float(1.0 / rng.uniform(170.0, 320.0)),
            disc_s=[float(v) for v in disc_s],
            disc_h=[float(v) for v in disc_h],
            body_rx=[float(v) for v in np.linspace(21, 27, N_DISCS) + rng.normal(0, 0.7, N_DISCS)],
            body_ry=[float(v) for v in np.linspace(14, 18, N_DISCS) + rng.normal(0, 0.5, N_DISCS)],
            shift_x=[float(v) for v in shift],
            canal_w=canal_w,
            canal_d=float(rng.uniform(7.0, 8.5)),
            foramen_x=[[float(v) for v in canal_w + rng.uniform(8.0, 10.5, 2)] for _ in range(N_DISCS)],
            recess_x=float(canal_w - rng.uniform(0.5, 1.5)),
            tissue_gain=[float(v) for v in rng.uniform(0.9, 1.1, len(TISSUE_NAMES))],
            texture=[[*rng.normal(0, 0.06, 3), rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.05)] for _ in range(4)],
            coil=[float(rng.uniform(0.15, 0.35)), float(rng.uniform(0.0, 0.3))],
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Phantom:
        return cls(**d)

    # --- coordinates ---------------------------------------------------------------------------------------------
    @property
    def _centre(self) -> np.ndarray:
        """Centre of curvature (y, z): 1/kappa posterior of the centreline at s = 0."""
        return np.array(self.origin[1:]) + np.array([np.cos(self.phi0), np.sin(self.phi0)]) / self.kappa

    def to_spine(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient points (N, 3) -> spine coordinates (s, b, x), each (N,)."""
        c = self._centre
        dy, dz = p[:, 1] - c[0], p[:, 2] - c[1]
        phi = np.arctan2(-dz, -dy)  # the centreline point lies at -n(phi) = -(cos, sin) from the centre
        s = (phi - self.phi0) / self.kappa
        b = 1.0 / self.kappa - np.hypot(dy, dz)
        x = p[:, 0] - self.origin[0] - np.interp(s, self.disc_s, self.shift_x)
        return s, b, x

    def from_spine(self, s: float, b: float, x: float) -> np.ndarray:
        """One point in spine coordinates -> patient (3,)."""
        phi = self.phi0 + self.kappa * s
        r = 1.0 / self.kappa - b
        y, z = self._centre - r * np.array([np.cos(phi), np.sin(phi)])
        return np.array([x + self.origin[0] + np.interp(s, self.disc_s, self.shift_x), y, z])

    def tangent(self, s: float) -> np.ndarray:
        """Unit vector along the spine at s, pointing inferiorly (patient coordinates)."""
        phi = self.phi0 + self.kappa * s
        return np.array([0.0, np.sin(phi), -np.cos(phi)])

    def posterior(self, s: float) -> np.ndarray:
        phi = self.phi0 + self.kappa * s
        return np.array([0.0, np.cos(phi), np.sin(phi)])

    # --- named structures ----------------------------------------------------------------------------------------
    def canal_b(self, k: int | np.ndarray) -> np.ndarray:
        return np.asarray(self.body_ry)[k] + 2.0 + self.canal_d

    def centre(self, condition: str, level: str) -> np.ndarray:
        """The 3D point a label coordinate marks: canal centre, foramen centre or recess centre at that disc."""
        k = FIRST_LEVEL + LEVELS.index(level)
        group, side = CONDITION_GROUP[condition], CONDITION_SIDE[condition]
        sign = {None: 0.0, "right": -1.0, "left": 1.0}[side]
        s, bc = self.disc_s[k], float(self.canal_b(k))
        if group == "spinal":
            return self.from_spine(s, bc, 0.0)
        if group == "foraminal":
            return self.from_spine(s - 3.0, self.body_ry[k] + 5.0, sign * self.foramen_x[k][SIDES.index(side)])
        return self.from_spine(s, bc - 0.1 * self.canal_d, sign * self.recess_x)

    def inside(self, condition: str, level: str, p: np.ndarray) -> np.ndarray:
        """Whether patient points (N, 3) lie in the nominal (uncompressed) structure a label names."""
        k = FIRST_LEVEL + LEVELS.index(level)
        s, b, x = self.to_spine(np.atleast_2d(p))
        group, side = CONDITION_GROUP[condition], CONDITION_SIDE[condition]
        ds, bc = s - self.disc_s[k], float(self.canal_b(k))
        if group == "spinal":
            return ((x / self.canal_w) ** 2 + ((b - bc) / self.canal_d) ** 2 <= 1) & (np.abs(ds) <= self.disc_h[k])
        sign = 1.0 if side == "left" else -1.0
        if group == "foraminal":
            xf = self.foramen_x[k][SIDES.index(side)]
            bf = self.body_ry[k] + 5.0
            return ((ds + 3.0) / 8.0) ** 2 + ((b - bf) / 4.5) ** 2 + ((x - sign * xf) / 5.0) ** 2 <= 1
        br = bc - 0.1 * self.canal_d
        return (ds / 7.0) ** 2 + ((b - br) / 4.0) ** 2 + ((x - sign * self.recess_x) / 4.0) ** 2 <= 1

    # --- rendering -----------------------------------------------------------------------------------------------
    def intensity(self, p: np.ndarray, contrast: str) -> np.ndarray:
        """MR intensity (float32, N) at patient points (N, 3): tissue lookup with the per-study gains."""
        lut = np.asarray(CONTRASTS[contrast], np.float32) * np.asarray(self.tissue_gain, np.float32)
        return lut[self.tissues(p)]

    def shading(self, p: np.ndarray) -> np.ndarray:
        """Smooth multiplicative field (float32, N): tissue texture (a few long sinusoids) times the coil bias."""
        t = np.ones(len(p), np.float32)
        for kx, ky, kz, phase, amp in self.texture:
            t += np.float32(amp) * np.sin(p @ np.array([kx, ky, kz], np.float32) + np.float32(phase))
        return t * self.bias(p)

    def bias(self, p: np.ndarray) -> np.ndarray:
        """Smooth receive-coil sensitivity (float32, N): the spine coil lies under the patient's back, so signal falls
        off anteriorly and laterally."""
        dy = (p[:, 1] - np.float32(self.origin[1] + 30.0)) * np.float32(0.01)
        dx = (p[:, 0] - np.float32(self.origin[0])) * np.float32(0.01)
        return np.exp(np.float32(self.coil[0]) * dy - np.float32(self.coil[1]) * dx**2)

    def tissues(self, p: np.ndarray) -> np.ndarray:
        """Tissue class (uint8, N) at patient points (N, 3)."""
        s, b, x = self.to_spine(p)
        lab = np.full(len(p), AIR, np.uint8)
        # Body outline: an elliptic cylinder along z (the back skin does not follow the lordosis), a subcutaneous
        # fat layer; then the back muscles and the psoas, which do follow the spine.
        e = ((p[:, 0] - self.origin[0]) / 165.0) ** 2 + ((p[:, 1] - self.origin[1] + 40.0) / 145.0) ** 2
        lab[e <= 1] = FAT
        lab[e <= 0.8] = SOFT
        ax = np.abs(x)
        lab[(((ax - 38.0) / 26.0) ** 2 + ((b - 48.0) / 28.0) ** 2 <= 1) & (e <= 0.8)] = MUSCLE
        lab[(((ax - 42.0) / 15.0) ** 2 + ((b + 6.0) / 20.0) ** 2 <= 1) & (s > self.disc_s[FIRST_LEVEL + 1])] = MUSCLE
        near = np.nonzero((ax < 48.0) & (b > -30.0) & (b < 80.0))[0]  # the spine itself: a fraction of the pixels
        if len(near):
            lab[near] = self._spine_tissues(s[near], b[near], x[near], lab[near])
        return lab

    def _spine_tissues(self, s: np.ndarray, b: np.ndarray, x: np.ndarray, lab: np.ndarray) -> np.ndarray:
        disc_s, disc_h = np.asarray(self.disc_s), np.asarray(self.disc_h)
        k = np.clip(np.searchsorted((disc_s[1:] + disc_s[:-1]) / 2, s), 0, N_DISCS - 1)  # nearest disc
        ds, hd = s - disc_s[k], disc_h[k] / 2
        rx, ry = np.asarray(self.body_rx)[k], np.asarray(self.body_ry)[k]
        ax, in_disc = np.abs(x), np.abs(ds) < hd
        side = (x > 0).astype(np.intp)
        top = disc_s[0] - 40.0
        sacrum = ds > hd + 2.0
        sacrum &= k == N_DISCS - 1
        # Vertebral bodies (marrow with a cortical shell and endplates) and discs (annulus around a nucleus).
        e_body = (x / rx) ** 2 + (b / ry) ** 2
        taper = np.where(sacrum, np.clip(1.0 - (ds - hd) / 120.0, 0.35, 1.0), 1.0) ** 2  # the sacrum narrows
        body = (e_body <= taper) & (s > top)
        shell = (e_body > taper * (1 - 2.2 / ry) ** 2) | ((np.abs(ds) - hd < 1.3) & ~sacrum)
        lab[body & ~in_disc] = np.where(shell, CORTEX, MARROW)[body & ~in_disc]
        lab[body & in_disc] = ANNULUS
        lab[body & in_disc & (e_body <= 0.42) & (np.abs(ds) < 0.62 * hd)] = NUCLEUS
        # Posterior elements: pedicles between the foramina, facet joints at each disc, laminae, spinous processes.
        cw, cd = self.canal_w, self.canal_d
        bc = ry + 2.0 + cd
        post = s > top
        lab[post & (ax >= cw) & (ax < cw + 8) & (b > ry - 1) & (b < bc + 2) & (np.abs(ds) > hd + 4)] = MARROW
        lab[post & (ax >= cw - 2) & (ax < cw + 14) & (b > bc - 2) & (b < bc + cd + 3) & (np.abs(ds) < 10)] = MARROW
        lamina = post & (ax < cw + 12) & (b >= bc + cd - 1) & (b < bc + cd + 7)
        lab[lamina] = np.where(np.abs(ds) < 3.0, LIGAMENT, MARROW)[lamina]
        spinous = post & (ax < 4.0) & (b >= bc + cd + 7) & (b < bc + cd + 38) & ~sacrum
        lab[spinous] = np.where(np.abs(ds - 18.0) < 9.0, MARROW, LIGAMENT)[spinous]
        # Foramina: the nominal tunnel is ligament/disc; its fat (bright on T1) shrinks with narrowing.
        gf = np.asarray(self.g_foramen)[k, side]
        xf = np.asarray(self.foramen_x)[k, side]
        ef = ((b - ry - 5.0) / 4.5) ** 2 + ((ax - xf) / 5.0) ** 2
        nominal = post & (((ds + 3.0) / 8.0) ** 2 + ef <= 1)
        lab[nominal] = LIGAMENT
        shrink = np.maximum(1.0 - 0.8 * gf, 0.12)
        fat = nominal & (((ds + 3.0) / (8.0 * shrink)) ** 2 + ((b - ry - 5.0) / (4.5 * shrink)) ** 2
                         + ((ax - xf) / 5.0) ** 2 <= 1)
        lab[fat] = FAT
        lab[nominal & (((ds + 6.0) / 2.6) ** 2 + ((b - ry - 5.0) / 2.6) ** 2 <= 1)] = NERVE  # exiting root
        c = np.nonzero(post & (ax < cw + 4.5) & (b > bc - cd - 0.5) & (b < bc + cd + 0.5))[0]  # the canal's box
        lab[c] = self._canal(lab[c], s[c], b[c], x[c], k[c], ds[c], hd[c], bc[c], side[c])
        return lab

    def _canal(self, lab, s, b, x, k, ds, hd, bc, side) -> np.ndarray:
        """Epidural fat, the thecal sac (CSF) with the cord or cauda equina, compression, and the lateral recesses."""
        cw, cd = self.canal_w, self.canal_d
        canal = (x / cw) ** 2 + ((b - bc) / cd) ** 2 <= 1
        lab[canal] = FAT
        phi = np.exp(-((ds / (hd + 3.0)) ** 2))  # compression is strongest at the disc and fades over a vertebra
        gc = np.asarray(self.g_canal)[k] * phi
        gr = np.asarray(self.g_recess)[k, side] * np.exp(-((ds / 7.0) ** 2))
        sd, sw = 0.85 * cd, 0.85 * cw
        front = bc - sd + 2 * sd * gc * 0.6  # disc bulge from the front ...
        back = bc + sd - 2 * sd * gc * 0.4  # ... ligamentum flavum from the back
        mid, half = (front + back) / 2, np.maximum((back - front) / 2, 0.3)
        width = sw * (1.0 - 0.3 * gc - 0.45 * gr)
        end = self.disc_s[-1] + 25.0  # the sac ends at S2
        sac = canal & (((x / width) ** 2 + ((b - mid) / half) ** 2) <= 1) & (s < end)
        rest = canal & ~sac
        lab[rest & (b < mid) & (np.abs(ds) < hd + 2)] = ANNULUS
        lab[rest & (b >= mid) & (np.abs(ds) < 9.0)] = LIGAMENT
        lab[sac] = CSF
        conus = self.disc_s[FIRST_LEVEL] - 8.0
        lab[sac & (s < conus) & ((x / 5.0) ** 2 + ((b - bc) / 4.0) ** 2 <= 1)] = NERVE  # the cord above L1
        for rx_, rb in ((-4.0, 2.5), (-1.5, 3.5), (1.5, 3.5), (4.0, 2.5), (-6.0, 0.5), (6.0, 0.5)):  # cauda equina
            lab[sac & (s >= conus) & ((x - rx_) ** 2 + (b - mid - rb * half / sd) ** 2 <= 1.0)] = NERVE
        # Lateral recesses: nominal space is facet/ligament, the CSF inside it closes with subarticular stenosis.
        br = bc - 0.1 * cd
        e = (ds / 7.0) ** 2 + ((b - br) / 4.0) ** 2 + ((np.abs(x) - self.recess_x) / 4.0) ** 2
        recess = e <= 1
        lab[recess] = LIGAMENT
        shrink = np.maximum(1.0 - 0.85 * np.asarray(self.g_recess)[k, side], 0.1)
        open_ = recess & ((ds / 7.0) ** 2 + (((b - br) / 4.0) ** 2 + ((np.abs(x) - self.recess_x) / 4.0) ** 2)
                          / shrink**2 <= 1)
        lab[open_] = CSF
        lab[recess & ((np.abs(x) - self.recess_x - 0.5) ** 2 + (b - br - 1.0) ** 2 <= 1.4**2)] = NERVE  # root
        return lab
