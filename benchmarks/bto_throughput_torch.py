"""The e3nn-for-PyTorch implementation timed by ``benchmarks/bto_throughput.py``: the same NequIP network written
with e3nn 0.6 (eager), and its ``Bench`` (parameters, equivariance check, inference and Adam training step)."""

from __future__ import annotations

import time

import numpy as np
from bto_throughput_common import SPECIES, Z_IRREPS, Bench, import_torch, random_rotation


# ============================================================== e3nn for PyTorch
def build_torch_model(cfg, avg_nn: float):
    import torch
    from e3nn import nn as enn
    from e3nn import o3

    hidden = o3.Irreps(cfg["hidden_irreps"]).sort().irreps.simplify()
    sh_irreps = o3.Irreps.spherical_harmonics(cfg["sh_lmax"])
    species_irreps = o3.Irreps(f"{len(SPECIES)}x0e")
    act = {1: torch.nn.functional.silu, -1: torch.tanh}

    def bessel_envelope(r: torch.Tensor) -> torch.Tensor:
        """sqrt(2/c) sin(n pi r/c)/r times the p = 6 polynomial envelope (e3nn-jax's bessel and poly_envelope(5, 2))."""
        c, p = cfg["cutoff"], cfg["envelope_p"]
        n = torch.arange(1, cfg["num_radial_basis"] + 1, dtype=r.dtype)
        x = (r / c)[:, None]
        basis = (2.0 / c) ** 0.5 * torch.sin(n * torch.pi * x) / r[:, None]
        env = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return basis * env * (x < 1)

    def producible(irreps_in):
        """Irreps of ``hidden`` that irreps_in (x) Y can give (as e3nn-jax, which drops structurally zero irreps)."""
        reach = {ir_out for _, ir_in in irreps_in for _, ir_sh in sh_irreps for ir_out in ir_in * ir_sh}
        return o3.Irreps([(m, ir) for m, ir in hidden if ir in reach])

    class Layer(torch.nn.Module):
        """NequIP layer: linear, "uvu" tensor-product convolution weighted by a radial MLP plus the self path x_j
        weighted per channel (as ours), linear, species self-connection, gate, residual."""

        def __init__(self, irreps_in):
            super().__init__()
            out = producible(irreps_in)
            scalars = o3.Irreps([(m, ir) for m, ir in out if ir.l == 0])
            gated = o3.Irreps([(m, ir) for m, ir in out if ir.l > 0])
            self.gate = enn.Gate(
                scalars, [act[ir.p] for _, ir in scalars], f"{gated.num_irreps}x0e", [torch.sigmoid], gated
            )
            pre_gate = self.gate.irreps_in
            self.linear_up = o3.Linear(irreps_in, irreps_in)
            mid, instructions = [], []
            for i, (mul, ir_in) in enumerate(irreps_in):
                for j, (_, ir_sh) in enumerate(sh_irreps):
                    for ir_out in ir_in * ir_sh:
                        if ir_out in pre_gate:
                            instructions.append((i, j, len(mid), "uvu", True))
                            mid.append((mul, ir_out))
            self.tp = o3.TensorProduct(
                irreps_in, sh_irreps, o3.Irreps(mid), instructions, shared_weights=False, internal_weights=False
            )
            # the self path of ours (x_j itself, weighted per channel, beside x_j (x) Y)
            keep = {ir for _, ir in pre_gate}
            self.self_index = [k for k, (m, ir) in enumerate(irreps_in) if ir in keep]
            self.self_irreps = o3.Irreps([irreps_in[k] for k in self.self_index])
            slices = irreps_in.slices()
            self.self_columns = torch.cat([torch.arange(slices[k].start, slices[k].stop) for k in self.self_index])
            self.self_weight_index = torch.cat(
                [
                    torch.arange(m).repeat_interleave(ir.dim) + sum(irreps_in[j].mul for j in self.self_index[:n])
                    for n, (m, ir) in enumerate(self.self_irreps)
                ]
            )
            self.radial = enn.FullyConnectedNet(
                [cfg["num_radial_basis"], *cfg["radial_hidden"], self.tp.weight_numel + self.self_irreps.num_irreps],
                torch.nn.functional.silu,
            )
            self.linear_down = o3.Linear(self.tp.irreps_out + self.self_irreps, pre_gate)
            self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, species_irreps, pre_gate)
            self.residual = irreps_in == self.gate.irreps_out

        def forward(self, x, onehot, sh, radial, senders, receivers):
            h = self.linear_up(x)
            weights = self.radial(radial)
            h_j = h[senders]
            w_tp, w_self = weights[:, : self.tp.weight_numel], weights[:, self.tp.weight_numel :]
            messages = torch.cat(
                [self.tp(h_j, sh, w_tp), h_j[:, self.self_columns] * w_self[:, self.self_weight_index]], dim=-1
            )
            agg = torch.zeros(x.shape[0], messages.shape[1], dtype=x.dtype).index_add_(0, receivers, messages)
            out = self.gate(self.linear_down(agg / avg_nn**0.5) + self.self_connection(x, onehot))
            return (out + x) / 2**0.5 if self.residual else out

    class Readout(torch.nn.Module):
        """As NodeReadout: x and the pairwise products of a compressed copy, species-indexed linear map."""

        def __init__(self, irreps_in):
            super().__init__()
            small = o3.Irreps([(min(m, cfg["readout_product_mul"]), ir) for m, ir in irreps_in])
            self.compress = o3.Linear(irreps_in, small)
            self.products = o3.FullTensorProduct(small, small, filter_ir_out=[ir for _, ir in o3.Irreps(Z_IRREPS)])
            self.out = o3.FullyConnectedTensorProduct(
                irreps_in + self.products.irreps_out, species_irreps, o3.Irreps(Z_IRREPS)
            )

        def forward(self, x, onehot):
            s = self.compress(x)
            return self.out(torch.cat([x, self.products(s, s)], dim=-1), onehot)

    class TorchNequIP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            first = o3.Irreps([(m, ir) for m, ir in hidden if ir == o3.Irrep("0e")])  # the embedding: scalars only
            self.embedding = o3.Linear(species_irreps, first)
            self.layers = torch.nn.ModuleList()
            irreps = first
            for _ in range(cfg["num_layers"]):
                self.layers.append(Layer(irreps))
                irreps = self.layers[-1].gate.irreps_out
            self.readout = Readout(irreps)

        def forward(self, positions, cell, onehot, senders, receivers, shifts):
            vectors = positions[receivers] - positions[senders] + shifts @ cell
            sh = o3.spherical_harmonics(sh_irreps, vectors, normalize=True, normalization="component")
            radial = bessel_envelope(vectors.norm(dim=-1))
            x = self.embedding(onehot)
            for layer in self.layers:
                x = layer(x, onehot, sh, radial, senders, receivers)
            return self.readout(x, onehot)

    return TorchNequIP()


def bench_torch(cfg, graph, born, avg_nn, torch_path, log) -> Bench:
    torch, _ = import_torch(torch_path)
    from e3nn import o3

    torch.manual_seed(0)
    model = build_torch_model(cfg, avg_nn)
    n_params = sum(p.numel() for p in model.parameters())
    t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    positions, cell, shifts = t(graph.positions), t(graph.cells[0]), t(graph.shifts)
    onehot = torch.nn.functional.one_hot(t(graph.species, torch.long), len(SPECIES)).float()
    senders, receivers = t(graph.senders, torch.long), t(graph.receivers, torch.long)
    args = (positions, cell, onehot, senders, receivers, shifts)
    # Target in e3nn-torch's basis: its 1o components are (y, z, x); permute the Cartesian axes, then project.
    ct = o3.ReducedTensorProducts("ij", i="1o", j="1o")
    yzx = [1, 2, 0]
    target = torch.einsum("nij,kij->nk", t(born[:, yzx][:, :, yzx]), ct.change_of_basis.float())
    rot = torch.as_tensor(random_rotation(), dtype=torch.float32)
    with torch.no_grad():
        out = model(*args)
        out_rot = model(positions @ rot.T, cell @ rot.T, *args[2:])
    d = o3.Irreps(Z_IRREPS).D_from_matrix(rot)
    equiv = float((out_rot - out @ d.T).abs().max() / out.abs().max())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def infer():
        with torch.no_grad():
            model(*args)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.mean((model(*args) - target) ** 2)
        loss.backward()
        optimizer.step()

    t0 = time.perf_counter()
    infer()
    step()
    warm = time.perf_counter() - t0
    log(
        f"  e3nn_torch: {n_params} parameters, equivariance error {equiv:.1e}, warm-up {warm:.1f} s, "
        f"{torch.get_num_threads()} threads"
    )
    return Bench(
        "e3nn_torch", n_params, infer, step, equiv, warm, {"threads": torch.get_num_threads(), "mode": "eager"}
    )
