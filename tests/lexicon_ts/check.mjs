// Reads {lexicons: [doc...], cases: [{nsid, record}]} on stdin; loads every doc with
// @atproto/lexicon's Lexicons (plus the official com.atproto.* schemas the docs refer to,
// from @atproto/api) and prints, per case, {valid, error} as one JSON array.
import { Lexicons, jsonToLex } from '@atproto/lexicon'
import { schemas } from '@atproto/api'

let input = ''
for await (const chunk of process.stdin) input += chunk
const { lexicons, cases } = JSON.parse(input)
const lex = new Lexicons()
for (const doc of lexicons) lex.add(doc)
const ours = new Set(lexicons.map((d) => d.id))
for (const doc of schemas) if (doc.id.startsWith('com.atproto.') && !ours.has(doc.id)) lex.add(doc)
const out = cases.map(({ nsid, record }) => {
  try {
    lex.assertValidRecord(nsid, jsonToLex(record))
    return { valid: true }
  } catch (e) {
    return { valid: false, error: String(e && e.message) }
  }
})
console.log(JSON.stringify(out))
