"""What the shop sells; a cart holds at most one line per product, so its size is bounded."""

from __future__ import annotations

PRODUCTS = frozenset(
    {
        "apple",
        "banana",
        "bread",
        "butter",
        "cheese",
        "coffee",
        "eggs",
        "flour",
        "honey",
        "jam",
        "milk",
        "oats",
        "pasta",
        "pepper",
        "rice",
        "salt",
        "sugar",
        "tea",
        "tomato",
        "yogurt",
    }
)
# Most units of one product added by one request.
MAX_QTY_PER_ADD = 99


def check_item(item: object) -> str | None:
    """Why ``item`` cannot be put in a cart, or None."""
    if not isinstance(item, str) or item not in PRODUCTS:
        return f"unknown product {item!r}; the catalog is {', '.join(sorted(PRODUCTS))}"
    return None


def check_qty(qty: object) -> str | None:
    if not isinstance(qty, int) or isinstance(qty, bool) or not 1 <= qty <= MAX_QTY_PER_ADD:
        return f"qty must be an integer from 1 to {MAX_QTY_PER_ADD}, got {qty!r}"
    return None
