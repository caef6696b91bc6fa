"""The offline plots: each stage's CSV becomes an SVG with a title, axis labels and its data, no script."""

import xml.etree.ElementTree as ET

from offline_opd import plots


def texts(svg: str) -> list[str]:
    return [el.text for el in ET.fromstring(svg).iter() if el.text and el.text.strip()]


def test_training_curve_is_a_labelled_line_of_every_row(tmp_path):
    (tmp_path / "loss.csv").write_text("step,loss,lr\n1,2.5,0.001\n2,2.0,0.002\n3,1.25,0.003\n")
    [svg_path] = plots.render_folder(tmp_path, "teacher")
    svg = svg_path.read_text()
    root = ET.fromstring(svg)                       # well-formed XML
    assert "script" not in svg and "http" not in svg.replace("http://www.w3.org/2000/svg", "")
    assert {"teacher: loss", "step", "loss"} <= set(texts(svg))   # title, x label, y label (lr left out)
    [line] = [el for el in root.iter() if el.tag.endswith("polyline")]
    points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(points) == 3 and points[0][0] < points[1][0] < points[2][0]
    assert points[0][1] < points[1][1] < points[2][1]          # falling loss is drawn downwards (SVG y grows down)


def test_named_rows_become_bars_and_an_empty_curve_says_so(tmp_path):
    (tmp_path / "accuracy.csv").write_text("model,accuracy\nteacher,0.9\nstudent_sft,0.45\n")
    (tmp_path / "loss.csv").write_text("step,loss\n")
    bars, empty = plots.render_folder(tmp_path, "evaluate")
    widths = [float(el.get("width")) for el in ET.fromstring(bars.read_text()).iter()
              if el.tag.endswith("rect") and el.get("fill") == plots.COLOURS[0]]
    assert len(widths) == 2 and abs(widths[0] / widths[1] - 2.0) < 1e-6
    assert {"teacher", "student_sft", "0.9", "0.45"} <= set(texts(bars.read_text()))
    assert "no rows: this run trained nothing" in texts(empty.read_text())
