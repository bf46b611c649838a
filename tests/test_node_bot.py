"""The bot inside the node: a visitor message reaches the policy, the answer is stored as a
`msg` from the bot (streamed as `delta` frames first), a handoff moves the conversation to
routing, and once a human has it the bot never speaks again. A stand-in knowledge base and
the fake provider (tests/fake_llm.py); the real knowledge base is tested on its own."""

from __future__ import annotations

from pathlib import Path

from kefu.config import AgentConfig, BotConfig, Config, LlmConfig, WsConfig
from kefu.node import Node
from tests.fake_llm import FakeLlm, Reply
from tests.test_bot_policy import FakeKb, Rule
from tests.test_node import hello, recv, run, say, send

ALICE = "alice-token"


def make(tmp_path: Path, llm_url: str | None = None) -> Node:
    llm = LlmConfig(base_url=llm_url, model="m", max_retries=0) if llm_url else LlmConfig()
    cfg = Config(
        data_dir=str(tmp_path),
        ws=WsConfig(host="127.0.0.1", port=0),
        agents=[AgentConfig(id="alice", name="Alice", token=ALICE)],
        bot=BotConfig(enabled=True, name="Kefu Bot", kb=[], llm=llm),
    )
    node = Node(cfg)
    return node


KB = FakeKb(
    {"运费多少": 0.9, "那退货呢": 0.5, "gibberish": 0.05},
    {"发票": Rule(reply="电子发票会在发货后24小时内发送。")},
)


def test_bot_answers_from_the_kb_then_hands_off(tmp_path: Path) -> None:
    async def body() -> None:
        node = make(tmp_path)
        await node.start()
        node._kb = KB
        try:
            alice, _ = await hello(node, ALICE)
            await send(alice, type="status", status="online")
            conv, _v, token, status, _ = await node.create_chat()
            assert status == "bot"  # the bot has it: no agent is involved yet
            visitor, welcome = await hello(node, token)
            assert welcome["convs"][0]["status"] == "bot"
            assert (await say(visitor, conv, "q1", "运费多少"))["seq"] == 1
            answer = await recv(visitor, "msg")
            while answer["seq"] == 1:
                answer = await recv(visitor, "msg")
            assert answer["seq"] == 2 and answer["from"] == {
                "role": "bot",
                "id": "bot",
                "name": "Kefu Bot",
            }
            assert answer["text"] == "answer 0 to 运费多少"
            assert answer["meta"]["source"] == "kb" and answer["meta"]["kb_entry"] == "e0"
            # A rule's canned reply, over REST this time: the reply comes in the answer.
            result = await node.send_message(conv, "我要发票")
            assert [m.text for m in result.replies] == ["电子发票会在发货后24小时内发送。"]
            assert result.status == "bot"
            # Nothing good in the KB: handoff, and the conversation goes to alice.
            result = await node.send_message(conv, "gibberish")
            assert result.replies == [] and result.status == "assigned"
            handoff = await recv(visitor, "handoff")
            assert handoff == {"type": "handoff", "conv": conv, "reason": "no_answer"}
            assigned = await recv(alice, "assigned")
            assert assigned["conv"] == conv
            assert [m["text"] for m in assigned["messages"]][-1] == "gibberish"
            # The bot never speaks again in it.
            result = await node.send_message(conv, "运费多少")
            assert result.replies == []
            history = node.history(conv, 0, 50)
            assert [m.from_.role for m in history.messages].count("bot") == 2
            await visitor.close()
            await alice.close()
        finally:
            await node.stop()

    run(body)


def test_asking_for_a_person_hands_off_at_once(tmp_path: Path) -> None:
    async def body() -> None:
        node = make(tmp_path)
        await node.start()
        node._kb = KB
        try:
            conv, *_ = await node.create_chat()
            result = await node.send_message(conv, "我要转人工")
            assert result.replies == [] and result.status == "queued"  # nobody online
        finally:
            await node.stop()

    run(body)


def test_llm_answer_streams_as_deltas_and_is_stored_whole(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeLlm() as fake:
            fake.script(Reply(text="退货请在签收后7天内申请。", chunk_chars=3))
            node = make(tmp_path, fake.url)
            await node.start()
            node._kb = KB
            try:
                conv, _v, token, *_ = await node.create_chat()
                visitor, _ = await hello(node, token)
                await say(visitor, conv, "q1", "运费多少")  # KB answer: a turn of the context
                await say(visitor, conv, "q2", "那退货呢")  # middling: the model
                deltas: list[str] = []
                stream_id = None
                while True:
                    frame = await recv(visitor)
                    if frame["type"] == "delta":
                        deltas.append(frame["text"])
                        stream_id = frame["stream_id"]
                    elif frame["type"] == "msg" and frame.get("meta", {}).get("source") == "llm":
                        break
                assert "".join(deltas) == frame["text"] == "退货请在签收后7天内申请。"
                assert len(deltas) > 1 and frame["meta"]["stream_id"] == stream_id
                sent = [m["content"] for m in fake.messages[0]]
                assert "运费多少" in sent and sent[-1] == "那退货呢"  # the earlier turn
                # REST with stream: the deltas reach the caller's callback too.
                fake.script(Reply(text="好的，已为您登记。", chunk_chars=2))
                pieces: list[str] = []
                result = await node.send_message(conv, "那退货呢", on_delta=pieces.append)
                assert "".join(pieces) == result.replies[0].text == "好的，已为您登记。"
                await visitor.close()
            finally:
                await node.stop()

    run(body)


def test_provider_down_still_gives_an_answer_or_a_handoff(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeLlm() as fake:
            node = make(tmp_path, fake.url)
            await node.start()
            node._kb = FakeKb({"okish": 0.5, "weak": 0.35})
            try:
                conv, *_ = await node.create_chat()
                fake.script(Reply(status=500))
                result = await node.send_message(conv, "okish")
                assert result.replies[0].meta["source"] == "fallback"
                fake.script(Reply(status=503))
                result = await node.send_message(conv, "weak")
                assert result.replies == [] and result.status == "queued"
            finally:
                await node.stop()

    run(body)
