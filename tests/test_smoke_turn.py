from tests.support.client import Reader, answer_text, transcript


async def test_a_turn_streams_and_is_saved(reader: Reader) -> None:
    ws = await reader.connect()
    await ws.chat("How warm should a sourdough starter be kept?")
    created = await ws.expect("chat_created")
    events = await ws.until("done")
    seqs = [e["seq"] for e in transcript(events)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "24-26" in answer_text(events)
    detail = (await reader.http.get(f"/api/chats/{created['chatId']}")).json()
    assert detail["lastSeq"] == seqs[-1]
