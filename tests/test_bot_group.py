"""An entry's ``group`` steers the bot's handoff (kefu.bot.policy, "Which humans"): the
conversation's topic is the entry retrieved last with confidence, and a handoff goes to its
group; without a group it is round robin as before; a group nobody is in means anyone.

Two agents: alice (weight 10, not in sales) whom the weighted round robin picks first, and
bob (weight 1, in sales). A real knowledge base file, a real node, agents over WebSocket."""

from __future__ import annotations

from pathlib import Path

from kefu.bot.kb import load_knowledge_base
from kefu.bot.policy import BotPolicy
from kefu.config import AgentConfig, BotConfig, Config, LlmConfig, WsConfig
from kefu.node import Node
from kefu.store import parse_conv_id
from tests.fake_llm import FakeLlm, Reply
from tests.test_node import hello, recv, run, send

KB = """\
entries:
  - id: laptop_price
    questions: ["笔记本电脑多少钱", "How much is the laptop?"]
    answer: "笔记本电脑售价4999元。"
    group: sales
  - id: shipping_fee
    questions: ["运费多少", "How much is shipping?"]
    answer: "满99元包邮。"
  - id: invoice_title
    questions: ["发票抬头怎么改"]
    answer: "在订单详情里修改发票抬头。"
    group: billing
"""
# Scores against KB (default tokenizer): "电脑能便宜点吗" 0.46 on laptop_price (between the
# thresholds 0.3 and 0.6); "今天天气" and "转人工" nothing.
SALES_MIDDLING = "电脑能便宜点吗"


def kb_file(tmp_path: Path) -> str:
    path = tmp_path / "kb.yaml"
    path.write_text(KB, encoding="utf-8")
    return str(path)


def make(tmp_path: Path, llm_url: str | None = None, **bot: object) -> Node:
    llm = LlmConfig(base_url=llm_url, model="m", max_retries=0) if llm_url else LlmConfig()
    cfg = Config(
        data_dir=str(tmp_path / "data"),
        ws=WsConfig(host="127.0.0.1", port=0),
        agents=[
            AgentConfig(id="alice", name="Alice", token="alice-token", weight=10, max_chats=50),
            AgentConfig(
                id="bob", name="Bob", token="bob-token", weight=1, max_chats=50, groups=["sales"]
            ),
        ],
        bot=BotConfig(kb=[kb_file(tmp_path)], kb_reload_interval_s=60, llm=llm, **bot),  # type: ignore[arg-type]
    )
    return Node(cfg)


async def online(node: Node, token: str) -> object:
    ws, _ = await hello(node, token)
    await send(ws, type="status", status="online")
    await recv(ws, "status")
    return ws


async def chat(node: Node, *texts: str) -> tuple[str, str | None]:
    """A new conversation saying ``texts`` in turn: (its status, its agent)."""
    conv, *_ = await node.create_chat()
    status = ""
    for text in texts:
        result = await node.send_message(conv, text)
        status = result.status
    state = node.conversations.get(parse_conv_id(conv))
    assert state is not None
    return status, state.agent_id


def test_handoffs_go_to_the_group_of_the_topic(tmp_path: Path) -> None:
    async def body() -> None:
        node = make(tmp_path)
        await node.start()
        try:
            alice = await online(node, "alice-token")
            bob = await online(node, "bob-token")
            # No group anywhere: the round robin, which picks alice (weight 10 to 1).
            assert await chat(node, "运费多少", "转人工") == ("assigned", "alice")
            assert await chat(node, "转人工") == ("assigned", "alice")  # no topic at all
            # A question about a sales entry, then "转人工": bob, though alice is free and
            # the round robin's choice.
            assert await chat(node, "笔记本电脑多少钱", "转人工") == ("assigned", "bob")
            assert await chat(node, "运费多少", "转人工") == ("assigned", "alice")
            # The topic is the latest confident hit: shipping (no group) replaced the laptop.
            assert await chat(node, "笔记本电脑多少钱", "运费多少", "转人工") == (
                "assigned",
                "alice",
            )
            # ... and a question the KB knows nothing about does not replace it.
            assert await chat(node, "笔记本电脑多少钱", "今天天气", "转人工") == (
                "assigned",
                "bob",
            )
            # no_answer for the message itself: a middling sales question (no LLM) goes to
            # sales; a question with no hit goes to the group of the earlier topic.
            assert await chat(node, SALES_MIDDLING) == ("assigned", "bob")
            assert await chat(node, "笔记本电脑多少钱", "今天天气呢") == ("assigned", "bob")
            # A group nobody is in: anyone, rather than a queue nobody serves.
            status, agent = await chat(node, "发票抬头怎么改", "转人工")
            assert status == "assigned" and agent in ("alice", "bob")
            # The topic went with the handoff: nothing of it is left in the policy.
            assert node.bot is not None and node.bot.stats()["topics"] == 0
            await alice.close()  # type: ignore[attr-defined]
            await bob.close()  # type: ignore[attr-defined]
        finally:
            await node.stop()

    run(body)


def test_a_busy_sales_group_queues_for_sales(tmp_path: Path) -> None:
    """Only alice is online: a sales handoff waits for sales (bob is in it, not here)."""

    async def body() -> None:
        node = make(tmp_path)
        await node.start()
        try:
            alice = await online(node, "alice-token")
            conv, *_ = await node.create_chat()
            await node.send_message(conv, "笔记本电脑多少钱")
            assert (await node.send_message(conv, "转人工")).status == "queued"
            assert await chat(node, "运费多少", "转人工") == ("assigned", "alice")
            bob = await online(node, "bob-token")  # the sales conversation is his at once
            state = node.conversations.get(parse_conv_id(conv))
            assert state is not None and (state.status, state.agent_id) == ("assigned", "bob")
            await alice.close()  # type: ignore[attr-defined]
            await bob.close()  # type: ignore[attr-defined]
        finally:
            await node.stop()

    run(body)


def test_llm_failures_hand_off_to_the_group(tmp_path: Path) -> None:
    """With an LLM: the middling question goes to the model; when it fails the handoff
    (llm_unavailable) goes to sales, and so does a later "转人工" after a good LLM answer."""

    async def body() -> None:
        async with FakeLlm() as fake:
            # answer_threshold 0.9: "电脑能便宜点吗" (0.46) is below the fallback threshold 0.6.
            node = make(tmp_path, fake.url, answer_threshold=0.9)
            await node.start()
            try:
                alice = await online(node, "alice-token")
                bob = await online(node, "bob-token")
                fake.script(Reply(status=500))
                assert await chat(node, SALES_MIDDLING) == ("assigned", "bob")
                fake.script(
                    Reply(text="笔记本电脑常有优惠活动。", chunk_chars=2, cut_after_chunks=2)
                )
                assert await chat(node, SALES_MIDDLING) == ("assigned", "bob")  # cut mid-way
                fake.script(Reply(text="可以参加满减活动。"))
                assert await chat(node, SALES_MIDDLING, "转人工") == ("assigned", "bob")
                assert len(fake.requests) == 3  # the model was asked each time
                assert await chat(node, "运费多少") == ("bot", None)  # a KB answer (1.0)
                assert len(fake.requests) == 3
                await alice.close()  # type: ignore[attr-defined]
                await bob.close()  # type: ignore[attr-defined]
            finally:
                await node.stop()

    run(body)


def test_topics_are_per_conversation_and_bounded(tmp_path: Path) -> None:
    kb = load_knowledge_base([kb_file(tmp_path)])
    policy = BotPolicy(BotConfig(), lambda: kb, max_contexts=2)

    async def body() -> None:
        await policy.decide(1, "笔记本电脑多少钱")
        await policy.decide(2, "运费多少")
        assert policy.topic(1) == ("laptop_price", "sales") and policy.topic_group(1) == "sales"
        assert policy.topic(2) == ("shipping_fee", None) and policy.topic_group(2) is None
        turn = await policy.decide(1, "我要转人工")
        assert turn.handoff is not None and (turn.handoff.reason, turn.handoff.group) == (
            "requested",
            "sales",
        )
        await policy.decide(3, "发票抬头怎么改")  # a third conversation: the oldest topic goes
        assert policy.topic(1) is None and policy.topic(3) == ("invoice_title", "billing")
        policy.forget(3)
        assert policy.topic(3) is None and policy.stats()["topics"] == 1

    run(body)
