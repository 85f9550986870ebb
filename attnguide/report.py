"""Small image helpers: grids with labels."""
from __future__ import annotations


def image_grid(rows: list[list], labels: list[str] | None = None, label_width: int = 80):
    """Paste rows of equally sized PIL images into one image, each row labelled on the left."""
    from PIL import Image, ImageDraw

    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    offset = label_width if labels else 0
    grid = Image.new("RGB", (offset + cols * w, len(rows) * h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (offset + c * w, r * h))
        if labels:
            draw.text((4, r * h + h // 2 - 6), labels[r], fill=(0, 0, 0))
    return grid
