"""The run plots: one curve per client with a legend that hides no curve."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure  # noqa: E402
import pytest  # noqa: E402

from ffrag_jax.training import metrics  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save (saving itself still happens)."""
    saved = []
    real = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


def test_federated_training_loss_has_a_line_per_client_across_rounds(tmp_path, figures):
    records = [{"kind": "train", "phase": "pretrain", "step": s, "loss": 5.0 / s, "time": s}
               for s in (1, 2)]
    records += [{"kind": "train", "phase": "ffrag", "round": r, "client": k, "name": c,
                 "step": (r - 1) * 20 + s, "loss": 10.0 - r - s, "time": 10 + r}
                for r in (1, 2) for k, c in enumerate(("0:clinic", "1:legal")) for s in (10, 20)]
    metrics.plot_training_loss(records, tmp_path / "loss.png", title="t")
    (fig,) = figures
    pretrain, ffrag = fig.axes[:2]
    assert [line.get_label() for line in ffrag.get_lines() if not line.get_label().startswith(
        "_")] == ["0:clinic", "1:legal"]
    clinic = ffrag.get_lines()[0]
    assert list(clinic.get_xdata()) == [10, 20, 30, 40]  # steps continue across rounds
    assert [t.get_text() for t in ffrag.get_legend().get_texts()] == ["0:clinic", "1:legal"]
    assert len(pretrain.get_lines()) == 1 and (tmp_path / "loss.png").stat().st_size > 0


def test_client_rounds_legend_sits_below_the_panels(tmp_path, figures):
    records = [{"kind": "eval", "round": r, "client": k, "name": f"{k}:d", "model": m,
                "loss": 5.0 - r}
               for k in range(10) for r, m in [(0, "base")] + [(r, m) for r in (1, 2)
                                                              for m in ("global", "fused")]]
    metrics.plot_client_rounds(records, tmp_path / "rounds.png")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_legend() is None and len(fig.legends) == 1
    assert len(fig.legends[0].get_texts()) == 20  # every client and model named
    # The legend lies below the panel: its top is under the axes' bottom.
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert legend_box.y1 <= ax.get_window_extent().y0
