// Reads {url, dictionary, expect, timeoutMs} on stdin, opens `url` (with compress=true) with
// Node's own WebSocket, and decompresses every binary message with Node's own zstd
// (node:zlib) and the dictionary file. Prints {events: [json], errors: [string]} once `expect`
// events arrived or `timeoutMs` passed.
import { readFileSync } from 'node:fs'
import { zstdDecompressSync } from 'node:zlib'

let input = ''
for await (const chunk of process.stdin) input += chunk
const { url, dictionary, expect, timeoutMs } = JSON.parse(input)
const dict = readFileSync(dictionary)

const events = []
const errors = []
let finish
const finished = new Promise((resolve) => (finish = resolve))
const ws = new WebSocket(url)
ws.binaryType = 'arraybuffer'
ws.onmessage = (message) => {
  if (typeof message.data === 'string') {
    errors.push(`a text message on a compressed connection: ${message.data.slice(0, 80)}`)
    return
  }
  try {
    const json = zstdDecompressSync(Buffer.from(message.data), { dictionary: dict })
    events.push(JSON.parse(json.toString('utf8')))
  } catch (e) {
    errors.push(`${e}`)
  }
  if (events.length >= expect) finish()
}
ws.onerror = (e) => errors.push(`websocket error: ${e.message ?? e}`)
const timer = setTimeout(finish, timeoutMs)
await finished
clearTimeout(timer)
ws.close()
process.stdout.write(JSON.stringify({ events, errors }) + '\n', () => process.exit(0))
