"""A tiny, deterministic e-commerce database for fast tests.

Three tables (``customers`` -> ``orders`` <- ``products``) generated from one seeded
NumPy generator, so one seed always gives the same rows and byte-identical parquet.
The dynamics are chosen so that the future is learnable from the past: each customer
has a latent daily order rate (set by a per-customer level and their segment) that
drifts as a slow random walk, and at some point may lapse for good; active customers
keep ordering at roughly their recent rate, lapsed ones never come back. Products are
picked with a per-customer favourite category and global popularity, channels with a
per-customer preference. Two thirds of customers sign up in the first month, the rest
later (after the first training seed times), so "exists at t" matters. Splits are
derived from ``n_days`` (val = start + n_days - 100 days, test = start + n_days - 60
days) so that 30-day windows give RelBench at least three training seed times and a
val and test window inside the data (RelBench wants val + 30 days to end at or before
the last row before test, hence a gap of more than 30 days). Tasks: ``customer-churn``
(no order in the next 30 days) and ``customer-spend`` (amount spent in the next 30
days), both over the customers that have signed up by the seed time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from relbench.manifest import KIND_FORECAST, TableSpec, TaskManifest

from tve_pipeline.datasets.writer import write_dataset

START = pd.Timestamp("2020-01-01")
TIMEDELTA = "30 days"
SEGMENTS = np.array(["consumer", "business", "student"])
SEGMENT_RATE = np.array([1.0, 1.6, 0.6])  # multiplies the daily order rate
CATEGORIES = np.array(["books", "games", "garden", "kitchen", "toys"])
CHANNELS = np.array(["web", "app", "store"])
SECONDS_PER_DAY = 86_400

CHURN_SQL = """
SELECT
    t."timestamp" AS "timestamp",
    c."customer_id" AS "customer_id",
    CAST(
        NOT EXISTS (
            SELECT 1
            FROM orders o
            WHERE o."customer_id" = c."customer_id"
                AND o."order_time" > t."timestamp"
                AND o."order_time" <= t."timestamp" + INTERVAL '{timedelta}'
        ) AS INTEGER
    ) AS "churn"
FROM timestamps t
JOIN customers c
    ON c."signup_time" <= t."timestamp"
"""

SPEND_SQL = """
SELECT
    t."timestamp" AS "timestamp",
    c."customer_id" AS "customer_id",
    COALESCE(SUM(o."amount"), 0) AS "spend"
FROM timestamps t
JOIN customers c
    ON c."signup_time" <= t."timestamp"
LEFT JOIN orders o
    ON o."customer_id" = c."customer_id"
    AND o."order_time" > t."timestamp"
    AND o."order_time" <= t."timestamp" + INTERVAL '{timedelta}'
GROUP BY t."timestamp", c."customer_id"
"""

TASKS = [
    TaskManifest(
        name="customer-churn",
        kind=KIND_FORECAST,
        task_type="binary_classification",
        description=(
            "1 if a customer who has signed up by the seed time places no order in the next "
            "30 days."
        ),
        entity_table="customers",
        entity_col="customer_id",
        target_col="churn",
        time_col="timestamp",
        timedelta=TIMEDELTA,
        sql=CHURN_SQL,
    ),
    TaskManifest(
        name="customer-spend",
        kind=KIND_FORECAST,
        task_type="regression",
        description=(
            "Total order amount in the next 30 days (0 if none), for customers signed up by "
            "the seed time."
        ),
        entity_table="customers",
        entity_col="customer_id",
        target_col="spend",
        time_col="timestamp",
        timedelta=TIMEDELTA,
        sql=SPEND_SQL,
    ),
]


def _pick(rng: np.random.Generator, weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One categorical draw per entry of ``rows`` from the row's weights (rows of ``weights``)."""
    cumulative = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    u = rng.random(len(rows))
    return np.minimum((cumulative[rows] < u[:, None]).sum(axis=1), weights.shape[1] - 1)


def _shop_tables(customers: pd.DataFrame, products: pd.DataFrame, orders: pd.DataFrame) -> dict:
    """The shop's schema (both generators write the same one)."""
    return {
        "customers": (customers, TableSpec(pkey="customer_id", time_col="signup_time")),
        "products": (products, TableSpec(pkey="product_id")),
        "orders": (
            orders,
            TableSpec(
                pkey="order_id",
                time_col="order_time",
                fkeys={"customer_id": "customers", "product_id": "products"},
            ),
        ),
    }


def _check_sizes(n_days: int, n_customers: int, n_products: int) -> None:
    """Refuse sizes too small for RelBench's windows or for the shop's schema."""
    if n_days < 200:
        raise ValueError(
            f"n_days={n_days}: need >= 200 for 3 training windows of 30 days before val"
        )
    if n_customers < 3 or n_products < 1:
        raise ValueError("need at least 3 customers and 1 product")


def _signup_days(rng: np.random.Generator, n_customers: int, n_days: int) -> np.ndarray:
    """Sorted signup days: two thirds in the first month, the rest up to ``n_days - 120``."""
    n_early = n_customers - n_customers // 3
    return np.sort(
        np.concatenate(
            [rng.uniform(0.5, 30, n_early), rng.uniform(30, n_days - 120, n_customers - n_early)]
        )
    )


def _split_timestamps(n_days: int) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The val and test timestamps: 100 and 60 days before the end of the data."""
    # RelBench needs val + 30 days <= the last row at or before test, so test - val must
    # exceed 30 days (with exactly 30, it would need a row stamped exactly at test).
    val = START + pd.Timedelta(days=n_days - 100)
    test = START + pd.Timedelta(days=n_days - 60)
    return val, test


def _customers(
    rng: np.random.Generator, n_customers: int, n_days: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The customers table, keyed in signup order, with their signup days and segments."""
    # A keyed table with a time column must be sorted by it.
    signup_day = _signup_days(rng, n_customers, n_days)
    signup_seconds = np.round(signup_day * SECONDS_PER_DAY).astype("int64")
    segment = rng.integers(0, len(SEGMENTS), n_customers)
    customers = pd.DataFrame(
        {
            "customer_id": np.arange(n_customers, dtype="int64"),
            "signup_time": (START + pd.to_timedelta(signup_seconds, unit="s")).astype(
                "datetime64[ns]"
            ),
            "segment": SEGMENTS[segment],
            "age": rng.integers(18, 76, n_customers).astype("int64"),
        }
    )
    return customers, signup_day, segment


def _products(rng: np.random.Generator, n_products: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The products table (lognormal price, a category each) and their category codes."""
    category = rng.integers(0, len(CATEGORIES), n_products)
    products = pd.DataFrame(
        {
            "product_id": np.arange(n_products, dtype="int64"),
            "price": np.round(np.exp(rng.normal(3.0, 0.7, n_products)), 2),
            "category": CATEGORIES[category],
        }
    )
    return products, category


def _daily_order_counts(
    rng: np.random.Generator, signup_day: np.ndarray, segment: np.ndarray, n_days: int
) -> np.ndarray:
    """Orders per (customer, day): Poisson draws of each customer's drifting daily rate."""
    n_customers = len(signup_day)
    # Daily order rate: level x segment, a slow multiplicative random walk, zero before
    # the first full day after signup and from the (possibly never) lapse day on.
    level = np.exp(rng.normal(np.log(0.08), 0.6, n_customers)) * SEGMENT_RATE[segment]
    drift = np.cumsum(rng.normal(0.0, 0.04, (n_customers, n_days)), axis=1)
    lapse_day = signup_day + rng.exponential(300.0, n_customers)
    day = np.arange(n_days)
    alive = (day[None, :] >= np.ceil(signup_day)[:, None]) & (day[None, :] < lapse_day[:, None])
    return rng.poisson(level[:, None] * np.exp(drift) * alive)


def _orders(
    rng: np.random.Generator,
    counts: np.ndarray,
    products: pd.DataFrame,
    category: np.ndarray,
) -> pd.DataFrame:
    """The orders table: one row per counted order, its product, channel and amount."""
    n_customers, n_products = counts.shape[0], len(category)
    order_customer, order_day = np.nonzero(counts)
    repeats = counts[order_customer, order_day]
    order_customer = np.repeat(order_customer, repeats)
    order_day = np.repeat(order_day, repeats)
    n_orders = len(order_customer)

    favourite = rng.integers(0, len(CATEGORIES), n_customers)
    popularity = rng.dirichlet(np.ones(n_products))
    product_weights = popularity[None, :] * np.where(
        category[None, :] == favourite[:, None], 4.0, 1.0
    )
    product = _pick(rng, product_weights, order_customer)
    channel = _pick(rng, rng.dirichlet(np.ones(len(CHANNELS)), n_customers), order_customer)
    quantity = 1 + rng.poisson(0.5, n_orders)
    order_seconds = order_day * SECONDS_PER_DAY + rng.integers(0, SECONDS_PER_DAY, n_orders)

    orders = pd.DataFrame(
        {
            "order_time": (START + pd.to_timedelta(order_seconds, unit="s")).astype(
                "datetime64[ns]"
            ),
            "customer_id": order_customer.astype("int64"),
            "product_id": product.astype("int64"),
            "quantity": quantity.astype("int64"),
            "amount": np.round(products["price"].to_numpy()[product] * quantity, 2),
            "channel": CHANNELS[channel],
        }
    )
    orders = orders.sort_values(
        ["order_time", "customer_id", "product_id"], kind="stable"
    ).reset_index(drop=True)
    orders.insert(0, "order_id", np.arange(n_orders, dtype="int64"))
    return orders


def build_synthetic(
    out_dir: str | Path,
    *,
    name: str | None = None,
    n_customers: int = 60,
    n_products: int = 25,
    n_days: int = 360,
    seed: int = 0,
) -> Path:
    """Generate the database and write it as a RelBench 3 folder at ``out_dir``, named
    ``name`` (default: the folder's name, as ``tve import files`` names a database whose
    YAML gives none; ``tve register`` takes the name from the manifest)."""
    _check_sizes(n_days, n_customers, n_products)
    rng = np.random.default_rng(seed)
    customers, signup_day, segment = _customers(rng, n_customers, n_days)
    products, category = _products(rng, n_products)
    counts = _daily_order_counts(rng, signup_day, segment, n_days)
    orders = _orders(rng, counts, products, category)
    val, test = _split_timestamps(n_days)
    return write_dataset(
        out_dir,
        name or Path(out_dir).name,
        _shop_tables(customers, products, orders),
        val,
        test,
        TASKS,
        description=(
            f"Synthetic e-commerce database from tve_pipeline.datasets.synthetic "
            f"(seed={seed}, n_customers={n_customers}, n_products={n_products}, n_days={n_days})."
        ),
    )


# --------------------------------------------------------------------------- #
# At scale
# --------------------------------------------------------------------------- #

REGIONS = np.array(["north", "south", "east", "west"])
#: Share of a customer's orders that go to their favourite category (else: global popularity).
FAVOURITE_SHARE = 0.6


def _days_to_ns(days: np.ndarray) -> np.ndarray:
    """Days after START (float) -> datetime64[ns], rounded to the second."""
    seconds = np.round(days * SECONDS_PER_DAY).astype("int64")
    return (np.datetime64(START.to_datetime64(), "s") + seconds.astype("timedelta64[s]")).astype(
        "datetime64[ns]"
    )


def _strings(values: np.ndarray, codes: np.ndarray) -> pd.Series:
    """``values[codes]`` as a pandas string column, built in Arrow (no Python str per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    taken = pc.take(pa.array(values.tolist(), pa.large_string()), pa.array(codes))
    return pd.Series(pd.array(taken, dtype="str"))


def _within(rng: np.random.Generator, key: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Index of one product per entry of ``group``: drawn by popularity within that category.

    ``key`` is ``category + cumulative popularity within the category`` over the products
    sorted by (category, id), so a draw is a single ``searchsorted`` for every row at once.
    """
    return np.minimum(
        np.searchsorted(key, group + rng.random(len(group)), side="left"), len(key) - 1
    )


def _scale_customers(
    rng: np.random.Generator, n_customers: int, n_days: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The customers table (with regions), their signup days as stored, and segments."""
    signup_time = _days_to_ns(_signup_days(rng, n_customers, n_days))
    # The days as written (rounded to the second), so no order falls before its signup.
    signup_day = (signup_time - np.datetime64(START.to_datetime64(), "ns")) / np.timedelta64(1, "D")
    segment = rng.integers(0, len(SEGMENTS), n_customers)
    customers = pd.DataFrame(
        {
            "customer_id": np.arange(n_customers, dtype="int64"),
            "signup_time": signup_time,
            "segment": _strings(SEGMENTS, segment),
            "region": _strings(REGIONS, rng.integers(0, len(REGIONS), n_customers)),
            "age": rng.integers(18, 76, n_customers).astype("int64"),
        }
    )
    return customers, signup_day, segment


def _scale_products(
    rng: np.random.Generator, n_products: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """The products table and each product's category code, quality and popularity."""
    # Price: lognormal around a category-specific level.
    category = rng.integers(0, len(CATEGORIES), n_products)
    category_price = np.log([12.0, 35.0, 25.0, 30.0, 18.0])
    products = pd.DataFrame(
        {
            "product_id": np.arange(n_products, dtype="int64"),
            "price": np.round(
                np.exp(category_price[category] + rng.normal(0.0, 0.5, n_products)), 2
            ),
            "category": CATEGORIES[category],
        }
    )
    quality = rng.normal(3.6, 0.7, n_products)
    popularity = rng.pareto(1.5, n_products) + 0.05
    return products, category, quality, popularity


def _order_times(
    rng: np.random.Generator,
    signup_day: np.ndarray,
    segment: np.ndarray,
    n_days: int,
    rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each order's customer and day: ``rows`` draws from the customers' order processes."""
    n_customers = len(signup_day)
    # Order process per customer: rate(s) = level * exp(trend * s), s = days since signup,
    # on [0, span), span = until the lapse or the end of the data.
    level = np.exp(rng.normal(0.0, 0.8, n_customers)) * SEGMENT_RATE[segment]
    trend = rng.normal(0.0, 0.6 / 365, n_customers)
    span = np.minimum(rng.exponential(400.0, n_customers), n_days - signup_day)
    growth = np.expm1(trend * span)  # integral of exp(trend * s) over the span, times trend
    safe_trend = np.where(np.abs(trend) < 1e-12, 1.0, trend)
    integral = np.where(np.abs(trend) < 1e-12, span, growth / safe_trend)
    expected = level * integral
    counts = rng.multinomial(rows, expected / expected.sum())

    order_customer = np.repeat(np.arange(n_customers, dtype="int64"), counts)
    u = rng.random(rows)
    t_trend, t_growth = trend[order_customer], growth[order_customer]
    since = np.where(
        np.abs(t_trend) < 1e-12,
        u * span[order_customer],
        np.log1p(u * t_growth) / np.where(np.abs(t_trend) < 1e-12, 1.0, t_trend),
    )
    del t_trend, t_growth, u
    # Strictly after signup (at least one second), strictly before the end of the data.
    order_day = signup_day[order_customer] + np.clip(since, 1.0 / SECONDS_PER_DAY, None)
    order_day = np.minimum(order_day, n_days - 1.0 / SECONDS_PER_DAY)
    return order_customer, order_day


def _order_products(
    rng: np.random.Generator,
    order_customer: np.ndarray,
    category: np.ndarray,
    popularity: np.ndarray,
    n_customers: int,
) -> np.ndarray:
    """Each order's product: from the customer's favourite category, else by popularity."""
    n_products, rows = len(category), len(order_customer)
    by_category = np.lexsort((np.arange(n_products), category))
    cat_sorted, pop_sorted = category[by_category], popularity[by_category]
    cat_total = np.bincount(category, weights=popularity, minlength=len(CATEGORIES))
    cum_within = np.cumsum(pop_sorted) - np.concatenate([[0.0], np.cumsum(cat_total)])[cat_sorted]
    key = cat_sorted + cum_within / cat_total[cat_sorted]  # increasing; category c fills (c, c + 1]
    global_key = np.cumsum(popularity) / popularity.sum()

    favourite = rng.integers(0, len(CATEGORIES), n_customers)
    from_favourite = rng.random(rows) < FAVOURITE_SHARE
    product = np.empty(rows, dtype="int64")
    product[from_favourite] = by_category[
        _within(rng, key, favourite[order_customer[from_favourite]])
    ]
    n_other = int((~from_favourite).sum())
    product[~from_favourite] = np.minimum(
        np.searchsorted(global_key, rng.random(n_other)), n_products - 1
    )
    return product


def _order_details(
    rng: np.random.Generator,
    order_customer: np.ndarray,
    product: np.ndarray,
    price: np.ndarray,
    quality: np.ndarray,
    n_customers: int,
) -> dict[str, np.ndarray]:
    """Each order's channel, quantity, amount (some discounted) and rating (30 %, else NaN)."""
    rows = len(order_customer)
    preferred = rng.integers(0, len(CHANNELS), n_customers)
    channel = np.where(
        rng.random(rows) < 0.7, preferred[order_customer], rng.integers(0, len(CHANNELS), rows)
    )
    quantity = 1 + rng.poisson(0.5, rows)
    discount = np.where(rng.random(rows) < 0.15, 0.8, 1.0)
    amount = np.round(price[product] * quantity * discount, 2)
    bias = rng.normal(0.0, 0.5, n_customers)
    rated = rng.random(rows) < 0.3
    score = np.clip(
        np.round(quality[product] + bias[order_customer] + rng.normal(0.0, 0.6, rows)), 1, 5
    )
    rating = np.where(rated, score, np.nan)
    return {"channel": channel, "quantity": quantity, "amount": amount, "rating": rating}


def _scale_orders(
    order_time: np.ndarray, order_customer: np.ndarray, product: np.ndarray, details: dict
) -> pd.DataFrame:
    """The orders table in time order, keyed 0..rows-1."""
    # Rows are generated customer by customer, so a stable sort by time orders ties by customer.
    order = np.argsort(order_time, kind="stable")
    return pd.DataFrame(
        {
            "order_id": np.arange(len(order), dtype="int64"),
            "order_time": order_time[order],
            "customer_id": order_customer[order],
            "product_id": product[order],
            "quantity": details["quantity"][order].astype("int64"),
            "amount": details["amount"][order],
            "rating": details["rating"][order],
            "channel": _strings(CHANNELS, details["channel"][order]),
        }
    )


def build_synthetic_at_scale(
    out_dir: str | Path,
    *,
    rows: int,
    customers: int | None = None,
    products: int | None = None,
    n_days: int = 730,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """A large e-commerce database with exactly ``rows`` orders, generated without row loops.

    Same schema and tasks as :func:`build_synthetic` (``customers`` -> ``orders`` <-
    ``products``), plus ``customers.region``, ``orders.rating`` (a nullable 1-5 score) and
    more products; ``customers`` defaults to ``rows // 10`` and ``products`` to
    ``max(50, rows // 1000)``. Dynamics that make the future predictable from the past:
    each customer orders as a Poisson process whose rate is their level (lognormal, times
    their segment's rate) times ``exp(trend * days since signup)`` (a per-customer trend of
    about +-60 % a year), from signup until a lapse (exponential, mean 400 days) after which
    they never order again; the orders are spread over customers by a multinomial on the
    expected counts so that their total is exactly ``rows``, and an order's time is drawn by
    inverting the rate's cumulative integral. A customer buys from a favourite category
    with probability 0.6 (else by global popularity), mostly on a preferred channel, and
    rates a product (30 % of orders) around its quality shifted by a personal bias.
    Two thirds of customers sign up in the first 30 days, the rest uniformly up to
    ``n_days - 120``. Memory is about 150 bytes per order (10 million orders: ~1.5 GB).
    """
    if rows < 1:
        raise ValueError(f"rows={rows}: need at least one order")
    n_customers = max(3, rows // 10) if customers is None else customers
    n_products = max(50, rows // 1000) if products is None else products
    _check_sizes(n_days, n_customers, n_products)
    rng = np.random.default_rng(seed)
    customers_df, signup_day, segment = _scale_customers(rng, n_customers, n_days)
    products_df, category, quality, popularity = _scale_products(rng, n_products)
    order_customer, order_day = _order_times(rng, signup_day, segment, n_days, rows)
    product = _order_products(rng, order_customer, category, popularity, n_customers)
    price = products_df["price"].to_numpy()
    details = _order_details(rng, order_customer, product, price, quality, n_customers)
    order_time = _days_to_ns(order_day)
    del order_day
    orders_df = _scale_orders(order_time, order_customer, product, details)
    del order_time, order_customer, product, details

    val, test = _split_timestamps(n_days)
    return write_dataset(
        out_dir,
        name or f"synthetic-{rows}",
        _shop_tables(customers_df, products_df, orders_df),
        val,
        test,
        TASKS,
        description=(
            "Synthetic e-commerce database from "
            "tve_pipeline.datasets.synthetic.build_synthetic_at_scale "
            f"(rows={rows}, customers={n_customers}, products={n_products}, "
            f"n_days={n_days}, seed={seed})."
        ),
    )
