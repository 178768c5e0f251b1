#pragma once
// emulation stub
