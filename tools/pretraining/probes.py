"""Lever measurements during pretraining (``--eval-every``): what a prompt learner could get from the model.

Zero-shot against a linear probe says whether the image features hold more than the plain prompt
reads; ``context_leverage`` and ``coop_ceiling`` say whether a learned context could move the class
weights to get it. They run on their own generated draws, never on the benchmark's splits nor on
the model card's eval sets, so that choosing a pretraining lever never looks at a test set.
"""
from __future__ import annotations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from pmpo.data import shapeworld as sw

from .captions import MARKERS
from .model import PREPROCESS_CFG, encode_text_truncated

# Separate generated draws, never the benchmark's splits (build_shapeworld_splits uses seed 0) nor the
# model card's seed-1234 eval sets: every pretraining lever is measured here.
PROBE_TRAIN = ("downstream", 777, 16)
PROBE_TEST = ("downstream", 999, 10)
KGCOOP_LAMBDA = 8.0  # KgCoOp's consistency weight (pmpo/configs/methods/kgcoop.yaml)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - mean) / std


_PROBE_CACHE: dict = {}


def probe_draws() -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """The probe's train and test draws as normalised image tensors and labels (rendered once)."""
    if not _PROBE_CACHE:
        for key, (style, seed, n) in (("train", PROBE_TRAIN), ("test", PROBE_TEST)):
            images, labels = sw.generate_eval_set(seed=seed, n_per_class=n, style=style)
            _PROBE_CACHE[key] = (_to_tensor(images), labels)
    return _PROBE_CACHE


@torch.no_grad()
def context_leverage(model: torch.nn.Module, text: torch.Tensor, n_ctx: int = 4, draws: int = 5) -> float:
    """Mean cosine between the class-name features of ``text`` ("a photo of a {}.") and the same with
    the embeddings of its first ``n_ctx`` words moved at random by their own norm: how much a
    CoOp-style context can change the class weights at all. Near 1, the text tower ignores the
    context positions and a learned context has little leverage (measured in docs/SHAPEWORLD.md:
    ~0.999 on every trained candidate, informative prefixes or not; ~0.8 at random init). A
    diagnostic only: it probes random moves, training follows the gradient."""
    emb = model.token_embedding(text)
    ctx = emb[:, 1:1 + n_ctx]
    scale = ctx.norm(dim=-1).mean() / ctx.shape[-1] ** 0.5
    f0 = F.normalize(encode_text_truncated(model, text).float(), dim=-1)
    gen = torch.Generator().manual_seed(0)
    cos = []
    for _ in range(draws):
        moved = emb.clone()
        moved[:, 1:1 + n_ctx] += torch.randn(ctx.shape, generator=gen).to(emb) * scale
        f = F.normalize(encode_text_truncated(model, text, moved).float(), dim=-1)
        cos.append(float((f * f0).sum(-1).mean()))
    return sum(cos) / len(cos)


def coop_ceiling(model: torch.nn.Module, text: torch.Tensor, f_train: torch.Tensor, y_train: np.ndarray,
                 f_test: torch.Tensor, y_test: np.ndarray, n_ctx: int = 4, steps: int = 300, lr: float = 0.01,
                 consistency: float = 0.0) -> float:
    """Test accuracy (%) of the best CoOp context this text tower admits on the probe draws: the
    ``n_ctx`` embeddings after SOT ("a photo of a") optimised full-batch with Adam on the frozen
    image features of the train draw, no augmentation, no few-shot noise in the optimiser. It
    separates the two reasons a prompt learner can fail to use a probe gap: a tower whose class
    weights no context can move where the image features need them (ceiling ~ zero-shot), or a
    recipe that does not find a context that exists (ceiling >> what the few-shot run reaches).

    ``consistency`` > 0 adds KgCoOp's term, that weight times the mean ``1 - cos`` between each
    class weight and its weight under the starting prompt (KgCoOp's prior, "a photo of a {}."):
    the best context KgCoOp (lambda = 8) may take. A gap that lies far from the prior's class
    weights shows as a KgCoOp ceiling well under the CoOp one."""
    classes = np.unique(y_train)
    assert np.array_equal(classes, np.unique(y_test))
    remap = {int(c): i for i, c in enumerate(classes)}
    yt = torch.tensor([remap[int(c)] for c in y_train])
    was_training = model.training
    model.eval()
    frozen = [q for q in model.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    with torch.no_grad():
        emb0 = model.token_embedding(text)
    ctx = torch.nn.Parameter(emb0[0, 1:1 + n_ctx].clone())
    opt = torch.optim.Adam([ctx], lr=lr)
    scale = float(model.logit_scale.exp())

    def weights() -> torch.Tensor:
        emb = torch.cat([emb0[:, :1], ctx.unsqueeze(0).expand(len(text), -1, -1), emb0[:, 1 + n_ctx:]], dim=1)
        return F.normalize(encode_text_truncated(model, text, emb).float(), dim=-1)

    with torch.no_grad():
        prior = weights() if consistency else None
    try:
        for _ in range(steps):
            w = weights()
            loss = F.cross_entropy(scale * f_train @ w.T, yt)
            if consistency:
                loss = loss + consistency * (1 - (w * prior).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = classes[(f_test @ weights().T).argmax(1).numpy()]
    finally:
        for q in frozen:
            q.requires_grad_(True)
        model.train(was_training)
    return 100.0 * float((pred == y_test).mean())


@torch.no_grad()
def probe_eval(model: torch.nn.Module, device: torch.device | str = "cpu", batch: int = 256,
               ds_prefix: str | None = None) -> dict[str, float]:
    """Base-class (32-way) zero-shot and linear-probe accuracy (%) on the probe draws: logistic
    regression on the normalised frozen image features (C chosen by 4-fold CV on the probe's own
    train draw), the procedure the benchmark's reference row uses."""
    from sklearn.linear_model import LogisticRegressionCV

    was_training = model.training
    model.eval()
    draws = probe_draws()
    base = np.array(sw.base_new_split()[0])
    feats = {}
    for key, (x, y) in draws.items():
        keep = np.isin(y, base)
        f = torch.cat([model.encode_image(x[keep][i:i + batch].to(device), normalize=True).float().cpu()
                       for i in range(0, int(keep.sum()), batch)])
        feats[key] = (f, y[keep])
    names = [sw.class_names()[i] for i in base]
    text = open_clip.tokenize([sw.TEMPLATES[0].format(n) for n in names]).to(device)
    tf = model.encode_text(text, normalize=True).float().cpu()
    f_test, y_test = feats["test"]
    zs = 100.0 * float(((f_test @ tf.T).argmax(1).numpy() == y_test).mean())
    # How far apart the text side holds two class names of one colour ("red circle" vs "red square"):
    # near 1, no prompt can make their class weights differ along shape (docs/SHAPEWORLD.md).
    colours = np.array([n.split()[0] for n in names])
    same = (colours[:, None] == colours[None, :]) & ~np.eye(len(names), dtype=bool)
    cos_same_colour = float((tf @ tf.T).numpy()[same].mean())
    clf = LogisticRegressionCV(Cs=[0.1, 1, 10, 100], cv=4, max_iter=2000)
    clf.fit(feats["train"][0].numpy(), feats["train"][1])
    probe = 100.0 * float((clf.predict(f_test.numpy()) == y_test).mean())
    model.train(was_training)
    out = {"zero_shot_base": round(zs, 2), "probe_base": round(probe, 2),
           "text_cos_same_colour": round(cos_same_colour, 3)}
    out["text_ctx_leverage"] = round(context_leverage(model, text), 3)
    f_train, y_train = feats["train"]
    with torch.enable_grad():
        out["coop_ceiling_base"] = round(coop_ceiling(model, text, f_train, y_train, f_test, y_test), 2)
        out["kgcoop_ceiling_base"] = round(coop_ceiling(model, text, f_train, y_train, f_test, y_test,
                                                        consistency=KGCOOP_LAMBDA), 2)
    if ds_prefix:  # zero-shot in the downstream captions' own phrasing: what a learned context could find
        prompts = [sw._fix_articles(f"{ds_prefix.format(bg='plain', m=MARKERS[0])} {n}.") for n in names]
        tds = model.encode_text(open_clip.tokenize(prompts).to(device), normalize=True).float().cpu()
        out["zero_shot_base_ds_phrasing"] = round(100.0 * float(((f_test @ tds.T).argmax(1).numpy() == y_test).mean()), 2)
    return out
