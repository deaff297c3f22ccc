#!/usr/bin/env node
// A stand-in for the native `solc` binary, backed by solc-js (the npm package `solc`).
//
// It implements only what py-solc-x uses:
//   solc --version                  -> the native banner, "Version: X.Y.Z+commit.H.<platform>",
//                                      which py-solc-x parses with a regex;
//   solc --standard-json [opts]     -> Standard JSON in on stdin, Standard JSON out on stdout.
// It calls the compiler through `require("solc").compile` rather than wrapping the `solcjs` CLI,
// so stdout carries nothing but the JSON (the CLI prints ">>>" lines before it).
// optinfer.contracts.compiler copies this file to <tools>/bin/solc, under the node_modules/solc
// that `make install` puts there, so require("solc") resolves to it.
"use strict";

const fs = require("fs");
const path = require("path");
const solc = require("solc");

const args = process.argv.slice(2);

if (args.includes("--version")) {
  process.stdout.write(
    "solc, the solidity compiler commandline interface\nVersion: " + solc.version() + "\n"
  );
  process.exit(0);
}

if (!args.includes("--standard-json")) {
  process.stderr.write("solc shim (solc-js): only --version and --standard-json are supported\n");
  process.exit(2);
}

// Imports not given in the input's `sources` are read from --base-path (default: the cwd),
// then from each --include-path, like native solc's file loader.
function optionValues(name) {
  const values = [];
  args.forEach((arg, i) => {
    if (arg === name && i + 1 < args.length) values.push(args[i + 1]);
  });
  return values;
}
const roots = [optionValues("--base-path")[0] || process.cwd()].concat(
  optionValues("--include-path")
);

function findImports(importPath) {
  for (const root of roots) {
    const candidate = path.resolve(root, importPath);
    if (fs.existsSync(candidate)) return { contents: fs.readFileSync(candidate, "utf8") };
  }
  return { error: "File not found: " + importPath };
}

const input = fs.readFileSync(0, "utf8");
process.stdout.write(solc.compile(input, { import: findImports }) + "\n");
