"""Would an align (LoRA-X / Cross-LoRA style) repair change anything here? Per matrix: ΔW carried into θ''s top-k
singular subspaces (ΔW' = U'U'ᵀ·ΔW·V'V'ᵀ... relative to the same made with θ's: U Uᵀ ΔW V Vᵀ) at the t=2 base."""
import glob, json, torch
from safetensors.torch import safe_open
from portllm.patch import Patch
from portllm.models import resolve_base
C = "/root/.cache/portllm-sweep/sweep"
theta = resolve_base("smollm2-135m")
lv = next(d for d in glob.glob(C + "/levels/*") if json.load(open(d + "/portllm_lineage.json"))["interpolated"]["t"] == 2.0)
patch = Patch.load(glob.glob(C + "/patches/*")[0], verify=False)
def tensors(d):
    out = {}
    for f in glob.glob(str(d) + "/*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = (f, k)
    return out
A, B = tensors(theta), tensors(lv)
def get(m, k):
    f, k = m[k]
    with safe_open(f, "pt") as h:
        return h.get_tensor(k).float()
rows = {}
for name, mod in list(patch.modules.items()):
    layer = int(name.split("layers.")[1].split(".")[0])
    if layer not in (0, 10, 20, 29):
        continue
    wn = mod.weight_name
    W, W2 = get(A, wn), get(B, wn)
    d = mod.delta().float()
    k = 64
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U2, S2, Vh2 = torch.linalg.svd(W2, full_matrices=False)
    proj = lambda U, Vh: U[:, :k] @ (U[:, :k].T @ d @ Vh[:k].T) @ Vh[:k]
    p1, p2 = proj(U, Vh), proj(U2, Vh2)
    # principal-angle overlap of the top-k left subspaces
    ov = torch.linalg.svdvals(U[:, :k].T @ U2[:, :k]).mean().item()
    rows.setdefault(name.rsplit(".", 1)[-1], []).append((ov, ((p2 - p1).norm() / d.norm()).item(), (p1.norm() / d.norm()).item()))
for t, v in rows.items():
    n = len(v)
    print(f"{t:10s} top-64 subspace overlap {sum(x[0] for x in v)/n:.4f}  ||align change||/||ΔW|| {sum(x[1] for x in v)/n:.4f}  share of ΔW in top-64 {sum(x[2] for x in v)/n:.3f}")
