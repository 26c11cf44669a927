"""Modbus RTU slaves for the device suites: pymodbus serving several slave
ids on one serial line (one end of a socat PTY pair), driven by the test
through JSON lines on stdin, answered on stdout.

    {"op": "set", "slave": 1, "table": "hr", "address": 10, "values": [1, 2]}
    {"op": "get", "slave": 1, "table": "hr", "address": 10, "count": 2}
    {"op": "mute", "slave": 1}        stop answering (as a slave that is off)
    {"op": "unmute", "slave": 1}
    {"op": "corrupt", "mode": "crc"}  answers with a bad CRC ("slave": with
                                      another slave's address; "off")
    {"op": "writes", "slave": 1}      write requests the slave has had

Tables: co (coils), di (discrete inputs), ir (input registers), hr
(holding registers). Every answer is {"ok": ...} or {"error": "..."}.
Needs pymodbus 3.9 (the version .ci/run installs).
"""

import argparse
import asyncio
import json
import sys

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import ModbusSerialServer

FC = {"co": 1, "di": 2, "hr": 3, "ir": 4}
SIZE = 1000


def slave_context():
    block = lambda: ModbusSequentialDataBlock(0, [0] * (SIZE + 1))
    return ModbusSlaveContext(di=block(), co=block(), hr=block(), ir=block())


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", required=True)
    ap.add_argument("--slaves", default="1")
    ap.add_argument("--baud", type=int, default=19200)
    ap.add_argument("--parity", default="N")
    a = ap.parse_args()

    contexts = {int(s): slave_context() for s in a.slaves.split(",")}
    muted = {}
    server_ctx = ModbusServerContext(slaves=dict(contexts), single=False)
    corrupt = {"mode": "off"}
    writes = {}

    def trace_pdu(sending: bool, pdu):
        if not sending and pdu.function_code in (5, 6, 15, 16):
            writes[pdu.dev_id] = writes.get(pdu.dev_id, 0) + 1
        return pdu

    def trace_packet(sending: bool, data: bytes) -> bytes:
        if not sending or corrupt["mode"] == "off" or len(data) < 4:
            return data
        if corrupt["mode"] == "crc":
            return data[:-2] + bytes([data[-2] ^ 0xFF, data[-1]])
        if corrupt["mode"] == "slave":
            body = bytes([(data[0] % 247) + 1]) + data[1:-2]
            c = crc16(body)
            return body + bytes([c & 0xFF, c >> 8])
        return data

    server = ModbusSerialServer(
        server_ctx,
        port=a.port,
        baudrate=a.baud,
        parity=a.parity,
        bytesize=8,
        stopbits=1,
        ignore_missing_slaves=True,
        trace_packet=trace_packet,
        trace_pdu=trace_pdu,
    )
    task = asyncio.create_task(server.serve_forever())

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ok": "ready"}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            req = json.loads(line)
            op = req["op"]
            if op in ("set", "get"):
                ctx = contexts[int(req["slave"])]
                fc = FC[req["table"]]
                if op == "set":
                    ctx.setValues(fc, int(req["address"]), list(req["values"]))
                    out = True
                else:
                    out = ctx.getValues(fc, int(req["address"]), int(req.get("count", 1)))
                    out = [int(v) for v in out]
            elif op == "mute":
                server_ctx._slaves.pop(int(req["slave"]), None)
                out = True
            elif op == "unmute":
                s = int(req["slave"])
                server_ctx._slaves[s] = contexts[s]
                out = True
            elif op == "writes":
                out = writes.get(int(req["slave"]), 0)
            elif op == "corrupt":
                corrupt["mode"] = req["mode"]
                out = True
            else:
                raise ValueError(f"unknown op {op}")
            print(json.dumps({"ok": out}), flush=True)
        except Exception as e:  # the test reads the reason
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
