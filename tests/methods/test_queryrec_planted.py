"""QueryRec's diffusion claim (Sec. 4.2) checked on planted truth: from a query's clicked
and shown-but-unclicked items, the diffusion model infers positives for queries that got
no click, "a form of denoising ... which can effectively avoid false positives".

Under task=ctr the embedded generator plants search appeal (`search_appeal_weight`):
some items are clicked whenever a search shows them, and a query names its session's
topic. So for a query without clicks, good generated positives are of the query's topic
(which only its unclicked results reveal) and appealing (clicked often under other
queries). Both are measured against chance: a random candidate's topic, and the mean
search click rate of the topic's items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.mark.slow
def test_diffusion_positives_of_queries_without_clicks_are_on_topic_and_appealing(cache_dir):
    import hydra

    from sar_exp.methods.queryrec_diffusion import DiffusionSettings, augment
    from tests.conftest import compose_cfg

    cfg = compose_cfg("method=queryrec", "backbone=din", "task=ctr", "protocol=queryrec",
                      output_dir=Path("unused"), cache_dir=cache_dir, tiny=False)  # fmt: skip
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.queryrec = None  # the lists only; the diffusion runs here
    view = datamodule.load()
    settings = DiffusionSettings(**cfg.method.queryrec_data.diffusion)
    arrays, _ = augment(view, settings, seed=0)
    topic = view["item_attributes"][:, 0]  # first_level_category_id comes first
    cl_off, cl_items = view["query_clicked_offsets"], view["query_clicked_items"]
    un_off, un_items = view["query_unclicked_offsets"], view["query_unclicked_items"]
    shows = np.bincount(np.concatenate([cl_items, un_items]), minlength=topic.size)
    rate = np.bincount(cl_items, minlength=topic.size) / np.maximum(shows, 1)
    candidates = np.flatnonzero(shows)
    on_topic, chance, generated_rate, topic_rate = [], [], [], []
    for q in range(cl_off.size - 1):
        if cl_off[q + 1] > cl_off[q] or un_off[q + 1] == un_off[q]:
            continue  # queries without a click, with shown items
        query_topic = np.bincount(topic[un_items[un_off[q] : un_off[q + 1]]]).argmax()
        added = arrays["items"][arrays["offsets"][q] : arrays["offsets"][q + 1]]
        on_topic.append((topic[added] == query_topic).mean())
        chance.append((topic[candidates] == query_topic).mean())
        generated_rate.append(rate[added].mean())
        topic_rate.append(rate[candidates[topic[candidates] == query_topic]].mean())
    assert len(on_topic) > 500
    assert np.mean(on_topic) > 2 * np.mean(chance)
    assert np.mean(generated_rate) > 2 * np.mean(topic_rate)
